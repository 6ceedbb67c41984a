//! Proves the Redis Cluster and Sentinel harnesses (`support::redis::cluster`,
//! `support::redis::sentinel`) that the topology tests rely on.

use std::{
    net::TcpStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use support::redis::{
    RedisCluster, RedisSentinel, blocking_connection,
    cluster::{SLOTS, key_slot, redis_cli},
};

/// A plain (not cluster-aware) connection to `port`.
fn connect(port: u16) -> redis::Connection {
    blocking_connection(port).expect("connect to a harness node")
}

/// `redis-cli -c -p <port> <args>`: redis-cli follows `MOVED` redirections with `-c`.
fn cluster_cli(port: u16, args: &[&str]) -> String {
    let mut all = vec!["-c".to_owned(), "-p".to_owned(), port.to_string()];
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    let (ok, output) = redis_cli(&all);
    assert!(ok, "redis-cli {all:?} failed: {output}");
    output.trim().to_owned()
}

/// Whether a process with this pid still exists (Linux).
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_three_master_cluster_agrees_on_every_slot_and_hashes_keys_as_redis_does() {
    let cluster = RedisCluster::three_masters();
    eprintln!("3-master cluster settled in {:?}", cluster.started_in());

    let topology = cluster.topology();
    assert_eq!(topology.masters().len(), 3, "{topology:?}");
    assert!(topology.replicas.is_empty(), "{topology:?}");
    assert!(topology.failed.is_empty(), "{topology:?}");
    assert_eq!(cluster.masters().len(), 3);
    let seeds = cluster.seed_urls();
    assert_eq!(seeds.len(), 3);
    for (n, seed) in seeds.iter().enumerate() {
        assert_ne!(cluster.node(n).port(), 6379);
        assert_eq!(
            *seed,
            format!("redis://127.0.0.1:{}/", cluster.node(n).port())
        );
    }
    for (_, info) in cluster.query_each::<String>(redis::cmd("CLUSTER").arg("INFO")) {
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }
    assert_eq!(topology.owner(0), topology.slots[0].2);
    assert_eq!(topology.owner(SLOTS - 1), topology.slots.last().unwrap().2);

    let mut con = connect(cluster.node(0).port());
    let mut keys: Vec<String> = (0..2000).map(|n| format!("key:{n}")).collect();
    keys.extend([
        "rc:{0123abcd}:lock".to_owned(),
        "rc:{0123abcd}:done".to_owned(),
        "{}empty-tag".to_owned(),
        "no{close".to_owned(),
        "{a}{b}".to_owned(),
        "x{}{y}".to_owned(),
        String::new(),
    ]);
    for key in &keys {
        let redis: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .unwrap();
        assert_eq!(key_slot(key.as_bytes()), redis, "slot of {key:?}");
    }
    assert_eq!(
        key_slot(b"rc:{0123abcd}:lock"),
        key_slot(b"rc:{0123abcd}:done")
    );
    let owners: std::collections::BTreeSet<usize> = keys
        .iter()
        .map(|key| cluster.master_of_key(key.as_bytes()))
        .collect();
    assert_eq!(owners.len(), 3, "2000 keys all land on {owners:?}");
}

#[test]
fn a_key_written_through_a_cluster_aware_client_lands_on_the_master_of_its_slot() {
    let cluster = RedisCluster::three_masters();
    let seed = cluster.node(0).port();
    cluster.reset_stats();

    let keys: Vec<String> = (0..30).map(|n| format!("rc:{{token-{n}}}:res")).collect();
    for key in &keys {
        assert_eq!(
            cluster_cli(seed, &["SET", key, "sealed", "PX", "60000"]),
            "OK"
        );
    }

    let mut on_master = std::collections::BTreeMap::<usize, u64>::new();
    for key in &keys {
        let owner = cluster.master_of_key(key.as_bytes());
        *on_master.entry(owner).or_default() += 1;
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query(&mut connect(cluster.node(owner).port()))
            .unwrap();
        assert_eq!(
            value.as_deref(),
            Some("sealed"),
            "{key} on its owner {owner}"
        );
        for other in cluster.masters().into_iter().filter(|m| *m != owner) {
            let refused = redis::cmd("GET")
                .arg(key)
                .query::<Option<String>>(&mut connect(cluster.node(other).port()))
                .expect_err("a plain connection to another master is redirected");
            let owner_addr = format!("127.0.0.1:{}", cluster.node(owner).port());
            assert_eq!(
                refused.redirect_node(),
                Some((owner_addr.as_str(), key_slot(key.as_bytes()))),
                "{refused}"
            );
        }
    }
    let per_master: Vec<(usize, u64)> = on_master.into_iter().collect();
    assert_eq!(cluster.keys_per_master(), per_master);

    let mut scanned = 0;
    for n in cluster.masters() {
        for (key, ttl) in cluster.keys_with_ttls(n) {
            assert_eq!(cluster.master_of_key(&key), n);
            assert!((1..=60_000).contains(&ttl), "PTTL {ttl}");
            scanned += 1;
        }
    }
    assert_eq!(scanned, keys.len());

    let stats = cluster.command_stats();
    let sets: u64 = stats.iter().filter_map(|(_, calls)| calls.get("set")).sum();
    assert_eq!(sets, keys.len() as u64, "{stats:?}");
    for (n, calls) in &stats {
        assert_eq!(
            calls.get("set").copied().unwrap_or(0),
            per_master
                .iter()
                .find(|(m, _)| m == n)
                .map_or(0, |(_, k)| *k),
            "node {n}: {calls:?}"
        );
    }
    cluster.reset_stats();
    for (n, calls) in cluster.command_stats() {
        assert_eq!(calls.get("set"), None, "node {n} after CONFIG RESETSTAT");
    }
}

#[test]
fn after_its_master_is_killed_a_replica_serves_the_slot_and_the_old_master_rejoins_as_its_replica()
{
    let mut cluster = RedisCluster::three_masters_three_replicas();
    eprintln!(
        "3-master 3-replica cluster settled in {:?}",
        cluster.started_in()
    );
    let topology = cluster.topology();
    assert_eq!(topology.masters().len(), 3, "{topology:?}");
    assert_eq!(topology.replicas.len(), 3, "{topology:?}");
    assert_eq!(cluster.replicas().len(), 3);

    let key = "rc:{flight}:res";
    let slot = key_slot(key.as_bytes());
    let old = cluster.master_of_slot(slot);
    let mut con = connect(cluster.node(old).port());
    redis::cmd("SET")
        .arg(key)
        .arg("pair")
        .query::<()>(&mut con)
        .unwrap();
    let acked: u64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut con).unwrap();
    assert_eq!(acked, 1, "the replica acknowledged the write");

    let failover = cluster.fail_over_slot(slot);
    eprintln!(
        "failover of slot {slot}: node {} -> node {} in {:?}",
        failover.killed, failover.promoted, failover.took
    );

    assert_eq!(failover.killed, old);
    assert_ne!(failover.promoted, old);
    assert_eq!(cluster.master_of_slot(slot), failover.promoted);
    assert_eq!(cluster.node(old).pid(), None);
    let keys = cluster.keys_per_node();
    assert_eq!(keys.len(), 5, "the killed node is not queried: {keys:?}");
    assert!(keys.contains(&(failover.promoted, 1)), "{keys:?}");
    assert_eq!(failover.topology.failed, [cluster.node(old).port()]);
    let promoted = cluster.node(failover.promoted).port();
    assert!(failover.topology.replicas_of(promoted).is_empty());
    let served: Option<String> = redis::cmd("GET")
        .arg(key)
        .query(&mut connect(promoted))
        .unwrap();
    assert_eq!(served.as_deref(), Some("pair"));
    let other_seed = cluster.seed_urls().len();
    assert_eq!(other_seed, 5, "the killed node is no seed");
    let survivor = cluster.live()[0];
    assert_eq!(
        cluster_cli(cluster.node(survivor).port(), &["GET", key]),
        "pair"
    );

    let took = cluster.restart(old);
    eprintln!("node {old} rejoined in {took:?}");
    let topology = cluster.topology();
    assert!(topology.failed.is_empty(), "{topology:?}");
    assert_eq!(
        topology.replicas_of(promoted),
        [cluster.node(old).port()],
        "{topology:?}"
    );
    assert_eq!(cluster.master_of_slot(slot), failover.promoted);
}

#[test]
fn dropping_a_cluster_kills_every_node() {
    let cluster = RedisCluster::three_masters();
    let nodes: Vec<(u32, u16)> = (0..cluster.node_count())
        .map(|n| (cluster.node(n).pid().unwrap(), cluster.node(n).port()))
        .collect();
    assert_eq!(nodes.len(), 3);

    drop(cluster);

    for (pid, port) in nodes {
        assert!(!process_exists(pid), "redis-server {pid} is still there");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}

#[test]
#[should_panic(expected = "apt-get install redis-tools")]
fn a_missing_redis_cli_fails_with_install_instructions() {
    support::redis::cluster::redis_cli_with("/nonexistent/redis-cli".as_ref(), &["--version"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_report_the_replica_as_master_after_a_kill_and_take_the_old_master_back() {
    let mut set = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .unwrap();
    eprintln!("Sentinel set settled in {:?}", set.started_in());
    assert_eq!(set.master_name(), "rc-master");
    assert_eq!(set.sentinel_urls().len(), 3);
    assert_eq!(
        set.master_addr(),
        ("127.0.0.1".to_owned(), set.node(0).port())
    );
    assert_eq!((set.master(), set.replica()), (0, 1));

    let mut master = set.node(0).connection().await;
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async::<()>(&mut master)
        .await
        .unwrap();
    let acked: u64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut master)
        .await
        .unwrap();
    assert_eq!(acked, 1);

    // The wait blocks a thread of its own: the runtime's tasks go on meanwhile.
    let killed = set.kill_master();
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let failover = tokio::task::spawn_blocking(move || killed.wait())
        .await
        .unwrap()
        .unwrap_or_else(|missing| panic!("no failover: {missing}\n{}", set.logs()));
    ticker.abort();
    eprintln!("Sentinel failover in {:?}", failover.took);
    assert!(ticks.load(Ordering::Relaxed) > 0);

    assert_eq!((failover.killed, failover.promoted), (0, 1));
    assert_eq!(set.node(0).pid(), None);
    assert_eq!(
        set.master_addr(),
        ("127.0.0.1".to_owned(), set.node(1).port())
    );
    assert_eq!(set.master(), 1);
    let mut promoted = set.node(1).connection().await;
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut promoted)
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("v"));

    let set = tokio::task::spawn_blocking(move || {
        let took = set.restart(0);
        eprintln!("old master back as a replica in {took:?}");
        set
    })
    .await
    .unwrap();
    assert_eq!(set.master(), 1);
    let mut old = set.node(0).connection().await;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut old).await.unwrap();
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"slave".to_vec()))
    );
}

#[test]
fn dropping_the_sentinel_set_kills_every_process() {
    let set = RedisSentinel::start();
    let processes: Vec<(u32, u16)> = (0..2)
        .map(|n| set.node(n))
        .chain((0..3).map(|n| set.sentinel(n)))
        .map(|s| (s.pid().unwrap(), s.port()))
        .collect();

    drop(set);

    for (pid, port) in processes {
        assert!(!process_exists(pid), "process {pid} is still there");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
