//! [`Connection`]: the store's command connection.

use redis::aio::ConnectionManager;

/// The connection manager, retrying a command once when it failed because a connection was
/// refused: the manager reconnects only after a command failed, so while Redis was away its
/// connection is a stored refusal, and without the retry the first command after Redis comes
/// back fails too (and the breaker's one trial after its cool-down is wasted). A refused
/// connection sent nothing, so the retry cannot run a command twice.
#[derive(Clone)]
pub(super) struct Connection(pub(super) ConnectionManager);

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            match self.0.req_packed_command(cmd).await {
                Err(error) if error.is_connection_refusal() => self.0.req_packed_command(cmd).await,
                result => result,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            match self.0.req_packed_commands(pipeline, offset, count).await {
                Err(error) if error.is_connection_refusal() => {
                    self.0.req_packed_commands(pipeline, offset, count).await
                }
                result => result,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}
