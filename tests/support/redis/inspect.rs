//! Reading a server's state for assertions, through a connection of the test's own.

use std::collections::BTreeMap;

use ::redis::aio::MultiplexedConnection;

/// Every key as `(key, PTTL in ms, value)`, sorted by key; see [`RedisServer::dump`].
///
/// [`RedisServer::dump`]: super::RedisServer::dump
pub(crate) async fn dump(con: &mut MultiplexedConnection) -> Vec<(Vec<u8>, i64, Vec<u8>)> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .unwrap_or_else(|e| panic!("SCAN failed: {e}"));
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    // SCAN may return a key more than once.
    keys.sort();
    keys.dedup();

    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let (kind, pttl): (String, i64) = ::redis::pipe()
            .atomic()
            .cmd("TYPE")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(con)
            .await
            .unwrap_or_else(|e| panic!("TYPE/PTTL failed: {e}"));
        let value = match kind.as_str() {
            "none" => continue,
            "string" => match query::<Option<Vec<u8>>>(con, "GET", &key, &[]).await {
                Some(value) => value,
                None => continue,
            },
            "set" => {
                let mut members: Vec<Vec<u8>> = query(con, "SMEMBERS", &key, &[]).await;
                members.sort();
                members.join(&b","[..])
            }
            "list" => query::<Vec<Vec<u8>>>(con, "LRANGE", &key, &["0", "-1"])
                .await
                .join(&b","[..]),
            "zset" => query::<Vec<Vec<u8>>>(con, "ZRANGE", &key, &["0", "-1"])
                .await
                .join(&b","[..]),
            "hash" => {
                let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query(con, "HGETALL", &key, &[]).await;
                pairs.sort();
                pairs
                    .into_iter()
                    .map(|(field, value)| [field, value].join(&b"="[..]))
                    .collect::<Vec<_>>()
                    .join(&b","[..])
            }
            other => format!("<{other}>").into_bytes(),
        };
        entries.push((key, pttl, value));
    }
    entries
}

/// `INFO commandstats` as command name -> calls; see [`RedisServer::command_stats`].
///
/// [`RedisServer::command_stats`]: super::RedisServer::command_stats
pub(crate) async fn command_stats(con: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("INFO commandstats failed: {e}"));
    info.lines()
        .filter_map(|line| {
            // cmdstat_set:calls=3,usec=12,usec_per_call=4.00,rejected_calls=0,failed_calls=0
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// One command with a key and literal arguments, panicking on error.
async fn query<T: ::redis::FromRedisValue>(
    con: &mut MultiplexedConnection,
    name: &str,
    key: &[u8],
    args: &[&str],
) -> T {
    ::redis::cmd(name)
        .arg(key)
        .arg(args)
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{name} failed: {e}"))
}
