//! Tracing: the flight's span is a child of the leader's request span, callers who join
//! link to it, and replayed callers link to its replay window, a span linked to the flight:
//! the links tie the whole storm together, and every span closes when its work is done.

use std::collections::HashMap;

use support::until;
use tracing::{
    Instrument, Subscriber,
    span::{Attributes, Id},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

use super::*;

/// What the subscriber saw: each span's name and parent, and each link.
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Seen>>);

#[derive(Default)]
struct Seen {
    names: HashMap<u64, String>,
    parents: HashMap<u64, u64>,
    /// (span, the span it follows from), by name.
    links: Vec<(String, String)>,
    closed: Vec<String>,
}

impl<S> Layer<S> for Recorded
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        let name = match attrs.metadata().name() {
            "request" => {
                let mut label = String::new();
                attrs.record(
                    &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                        if field.name() == "caller" {
                            label = format!("request {value:?}");
                        }
                    },
                );
                label
            }
            other => other.to_owned(),
        };
        seen.names.insert(id.into_u64(), name);
        let parent = attrs
            .parent()
            .cloned()
            .or_else(|| ctx.current_span().id().cloned());
        if let Some(parent) = parent.filter(|_| !attrs.is_root()) {
            seen.parents.insert(id.into_u64(), parent.into_u64());
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        let name = seen.names.get(&id.into_u64()).cloned().unwrap_or_default();
        seen.closed.push(name);
    }

    fn on_follows_from(&self, span: &Id, follows: &Id, _ctx: Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        let name = |id: &Id| seen.names.get(&id.into_u64()).cloned().unwrap_or_default();
        let link = (name(span), name(follows));
        seen.links.push(link);
    }
}

impl Recorded {
    fn parent_of(&self, name: &str) -> Option<String> {
        let seen = self.0.lock().unwrap();
        let (id, _) = seen.names.iter().find(|(_, n)| *n == name)?;
        let parent = seen.parents.get(id)?;
        seen.names.get(parent).cloned()
    }

    fn closed(&self, name: &str) -> bool {
        self.0.lock().unwrap().closed.iter().any(|n| n == name)
    }

    fn links(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().links.clone()
    }
}

#[tokio::test]
async fn joined_and_replayed_callers_link_to_the_flight_of_the_leader() {
    let recorded = Recorded::default();
    let _subscriber = tracing_subscriber::registry()
        .with(recorded.clone())
        .set_default();

    let inner = Gated::closed();
    let (front, handle) = front(|builder| builder, &inner);
    let token = tokens::refresh("dave");
    let call = |caller: u32| {
        let (front, token) = (front.clone(), token.clone());
        tokio::spawn(
            async move { send(&front, bearer(&token)).await }
                .instrument(tracing::info_span!("request", caller)),
        )
    };
    let leader = call(1);
    until(|| handle.stats().leader == 1).await;
    let joined = call(2);
    until(|| handle.stats().joined == 1).await;
    inner.open();
    let (leader, joined) = (leader.await.unwrap(), joined.await.unwrap());
    let replayed = call(3).await.unwrap();
    assert_eq!(
        [leader.coalesced, joined.coalesced, replayed.coalesced].map(|c| c.unwrap().outcome()),
        [Outcome::Leader, Outcome::Joined, Outcome::Replayed]
    );
    assert_eq!(inner.calls(), 1);

    assert_eq!(
        recorded.parent_of("refresh_coalesce_flight").as_deref(),
        Some("request 1"),
        "the flight runs under the leader's request"
    );
    assert_eq!(
        recorded.parent_of("refresh_coalesce_replay"),
        None,
        "the replay window is no child: it would hold the flight's span open for the TTL"
    );
    assert_eq!(
        recorded.links(),
        [
            ("request 2".to_owned(), "refresh_coalesce_flight".to_owned()),
            (
                "refresh_coalesce_replay".to_owned(),
                "refresh_coalesce_flight".to_owned()
            ),
            ("request 3".to_owned(), "refresh_coalesce_replay".to_owned()),
        ]
    );
    // The leader's request and the flight closed with the flight, while the replay
    // window, still open, lasts its TTL.
    assert!(recorded.closed("request 1") && recorded.closed("refresh_coalesce_flight"));
    assert!(!recorded.closed("refresh_coalesce_replay"));
}
