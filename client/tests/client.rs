//! The client against a fake cluster (see `common`): pipelining, retries, routing, listing
//! merge, batches and error surfacing.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use client::{Client, ClientConfig, ClientError, ErrorCode, Stat};
use common::FakeCluster;

fn config() -> ClientConfig {
    ClientConfig { request_timeout: Duration::from_secs(10), ..ClientConfig::default() }
}

async fn connect(cluster: &FakeCluster) -> Client {
    Client::connect(cluster.seed(), config()).await.expect("connect to the fake cluster")
}

#[tokio::test]
async fn hello_gives_the_shard_map() {
    let cluster = FakeCluster::start(3).await;
    let client = connect(&cluster).await;
    assert_eq!(client.shard_count(), 3);
    assert_eq!(client.addresses(), cluster.addresses);
    assert_eq!(client.shard_for(b"some key"), wire::shard_for(b"some key", 3));
}

#[tokio::test]
async fn refused_hello_is_a_server_error_and_transient_ones_are_retried() {
    let cluster = FakeCluster::start(2).await;
    cluster.shards[0].refuse_next_of("Hello", ErrorCode::Unavailable, "starting");
    let client = connect(&cluster).await;
    assert_eq!(client.shard_count(), 2);
    assert_eq!(cluster.shards[0].requests("Hello"), 2);

    cluster.shards[0].refuse_next_of("Hello", ErrorCode::Internal, "no shard map");
    let error = Client::connect(cluster.seed(), config()).await.unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::Internal, .. }), "{error:?}");
}

#[tokio::test]
async fn pipelined_requests_complete_out_of_order() {
    let cluster = FakeCluster::start(1).await;
    let client = connect(&cluster).await;
    for index in 0..16 {
        client.put(format!("key-{index}").as_bytes(), format!("value-{index}").as_bytes()).await.unwrap();
    }
    let shard = &cluster.shards[0];
    shard.behavior.reverse_groups.store(16, Ordering::SeqCst);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..16 {
        let client = client.clone();
        tasks.spawn(async move { (index, client.get(format!("key-{index}").as_bytes(), None).await) });
    }
    let mut answered = 0;
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined.unwrap();
        assert_eq!(result.unwrap().unwrap().value, format!("value-{index}").as_bytes());
        answered += 1;
    }
    assert_eq!(answered, 16);
    assert!(shard.reordered_groups.load(Ordering::SeqCst) >= 1, "the fake never answered out of order");
    assert_eq!(shard.accepted.load(Ordering::SeqCst), 1, "all requests share one connection");
}

#[tokio::test]
async fn get_is_retried_after_a_dropped_connection() {
    let cluster = FakeCluster::start(1).await;
    let client = connect(&cluster).await;
    client.put(b"k", b"v").await.unwrap();
    let shard = &cluster.shards[0];
    shard.drop_next("Get");
    let found = client.get(b"k", None).await.unwrap().unwrap();
    assert_eq!(found.value, &b"v"[..]);
    assert_eq!(shard.requests("Get"), 2);
    assert_eq!(shard.accepted.load(Ordering::SeqCst), 2, "the retry used a fresh connection");
}

#[tokio::test]
async fn put_is_not_retried_after_a_dropped_connection() {
    let cluster = FakeCluster::start(1).await;
    let client = connect(&cluster).await;
    let shard = &cluster.shards[0];
    shard.drop_next("Put");
    let error = client.put(b"k", b"v").await.unwrap_err();
    assert!(matches!(error, ClientError::ConnectionLost { .. }), "{error}");
    assert_eq!(shard.requests("Put"), 1);
    // The write happened but its acknowledgement was lost: exactly why it must not be resent.
    assert_eq!(client.get(b"k", None).await.unwrap().unwrap().value, &b"v"[..]);
    assert_eq!(shard.accepted.load(Ordering::SeqCst), 2, "the next request reconnected");
}

#[tokio::test]
async fn every_pending_request_fails_when_the_connection_breaks() {
    let cluster = FakeCluster::start(1).await;
    let client = Client::connect(cluster.seed(), ClientConfig { retries: 0, ..config() }).await.unwrap();
    client.put(b"k", b"v").await.unwrap();
    cluster.shards[0].drop_next("Get");
    // The test runtime is single threaded: all four are registered before the server reads one.
    let (a, b, c, d) =
        tokio::join!(client.get(b"k", None), client.get(b"k", None), client.get(b"k", None), client.get(b"k", None));
    for result in [a, b, c, d] {
        assert!(matches!(result, Err(ClientError::ConnectionLost { .. })), "{result:?}");
    }
    assert_eq!(client.get(b"k", None).await.unwrap().unwrap().value, &b"v"[..]);
}

#[tokio::test]
async fn list_merges_shards_with_continuation() {
    for page_max in [0, 2] {
        let cluster = FakeCluster::start(3).await;
        for shard in &cluster.shards {
            shard.behavior.list_page_max.store(page_max, Ordering::SeqCst);
        }
        let client = connect(&cluster).await;
        let mut expected = Vec::new();
        for index in 0..60 {
            let key = format!("p/{index:03}");
            client.put(key.as_bytes(), &[b'x'; 3]).await.unwrap();
            expected.push(key.into_bytes());
            client.put(format!("q/{index:03}").as_bytes(), b"other prefix").await.unwrap();
        }
        assert!(cluster.shards.iter().all(|shard| !shard.keys().is_empty()), "keys spread over every shard");

        let mut listed = Vec::new();
        let mut start_after = Vec::new();
        let mut pages = 0;
        loop {
            let page = client.list(b"p/", &start_after, 7, None).await.unwrap();
            assert!(page.entries.len() <= 7);
            pages += 1;
            assert!(pages <= 100, "listing does not advance");
            listed.extend(page.entries.iter().map(|entry| {
                assert_eq!(entry.size, 3);
                entry.key.clone()
            }));
            match page.next {
                Some(next) => start_after = next,
                None => break,
            }
        }
        assert_eq!(listed, expected, "page cap {page_max}");

        let all = client.list(b"p/", b"", 1000, None).await.unwrap();
        if page_max == 0 {
            assert_eq!(all.entries.len(), 60);
            assert_eq!(all.next, None);
        } else {
            assert!(all.next.is_some(), "capped shards have more");
        }
        assert!(client.list(b"none/", b"", 10, None).await.unwrap().entries.is_empty());
    }
}

#[tokio::test]
async fn server_errors_surface_with_their_code() {
    let cluster = FakeCluster::start(1).await;
    let client = connect(&cluster).await;
    let shard = &cluster.shards[0];
    shard.refuse_next(ErrorCode::KeyTooLarge, "key of 5000 bytes exceeds 4096");
    let error = client.put(b"k", b"v").await.unwrap_err();
    let ClientError::Server { code, message } = &error else { panic!("{error:?}") };
    assert_eq!(*code, ErrorCode::KeyTooLarge);
    assert_eq!(message, "key of 5000 bytes exceeds 4096");
    assert_eq!(error.exit_code(), client::exit_code::REFUSED);

    // A permanent error is not retried, even for a read.
    shard.refuse_next(ErrorCode::SnapshotTooOld, "too old");
    let error = client.get(b"k", Some(1)).await.unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::SnapshotTooOld, .. }), "{error:?}");
    assert_eq!(shard.requests("Get"), 1);
}

#[tokio::test]
async fn transient_errors_are_retried_for_reads_only() {
    let cluster = FakeCluster::start(1).await;
    let client = connect(&cluster).await;
    let shard = &cluster.shards[0];
    client.put(b"k", b"v").await.unwrap();

    shard.refuse_next(ErrorCode::Unavailable, "fenced");
    shard.refuse_next(ErrorCode::TooManyInFlight, "busy");
    assert_eq!(client.get(b"k", None).await.unwrap().unwrap().value, &b"v"[..]);
    assert_eq!(shard.requests("Get"), 3);

    shard.refuse_next(ErrorCode::Unavailable, "fenced");
    let error = client.put(b"k", b"w").await.unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::Unavailable, .. }), "{error:?}");
    assert_eq!(shard.requests("Put"), 2);
}

#[tokio::test]
async fn retries_give_up_after_the_configured_count() {
    let cluster = FakeCluster::start(1).await;
    let client = Client::connect(cluster.seed(), ClientConfig { retries: 2, ..config() }).await.unwrap();
    let shard = &cluster.shards[0];
    for _ in 0..3 {
        shard.drop_next("Stat");
    }
    let error = client.stat(b"k", None).await.unwrap_err();
    assert!(matches!(error, ClientError::ConnectionLost { .. }), "{error:?}");
    assert_eq!(shard.requests("Stat"), 3);
}

#[tokio::test]
async fn batch_put_sends_one_request_per_shard() {
    let cluster = FakeCluster::start(3).await;
    let client = connect(&cluster).await;
    let keys = (0..30).map(|index| format!("batch/{index}")).collect::<Vec<_>>();
    let items = keys.iter().map(|key| (key.as_bytes(), key.as_bytes())).collect::<Vec<(&[u8], &[u8])>>();
    let ts = client.batch_put(&items).await.unwrap();
    for shard in &cluster.shards {
        assert_eq!(shard.requests("BatchPut"), 1, "shard {}", shard.id);
    }
    let mut ts_seen = Vec::new();
    for key in &keys {
        let found = client.get(key.as_bytes(), None).await.unwrap().unwrap();
        assert_eq!(found.value, key.as_bytes());
        assert!(found.ts <= ts);
        ts_seen.push(found.ts);
    }
    assert!(ts_seen.contains(&ts), "the largest part timestamp is returned");
    assert_eq!(client.batch_put(&[]).await.unwrap(), 0);
}

#[tokio::test]
async fn stat_delete_and_reads_at_a_timestamp() {
    let cluster = FakeCluster::start(2).await;
    let client = connect(&cluster).await;
    let first = client.put(b"doc", b"one").await.unwrap();
    let second = client.put(b"doc", b"second").await.unwrap();
    assert!(second > first);
    assert_eq!(client.stat(b"doc", None).await.unwrap(), Some(Stat { ts: second, size: 6, chunks: 0, versions: 2 }));
    let deleted = client.delete(b"doc").await.unwrap();
    assert!(deleted > second);
    assert_eq!(client.get(b"doc", None).await.unwrap(), None);
    assert_eq!(client.stat(b"doc", None).await.unwrap(), None);
    let old = client.get(b"doc", Some(first)).await.unwrap().unwrap();
    assert_eq!((old.ts, &old.value[..]), (first, &b"one"[..]));
    assert!(matches!(client.delete(b"doc").await, Err(ClientError::NotFound)));
    assert_eq!(client.get(b"never", None).await.unwrap(), None);
}

#[tokio::test]
async fn timeout_when_the_server_does_not_answer() {
    let cluster = FakeCluster::start(1).await;
    let quick = ClientConfig { request_timeout: Duration::from_millis(200), ..config() };
    let client = Client::connect(cluster.seed(), quick).await.unwrap();
    cluster.shards[0].behavior.stall.store(true, Ordering::SeqCst);
    let error = client.get(b"k", None).await.unwrap_err();
    assert!(matches!(error, ClientError::Timeout), "{error:?}");
    assert_eq!(cluster.shards[0].requests("Get"), 1, "a timeout is not retried");
    cluster.shards[0].behavior.stall.store(false, Ordering::SeqCst);
    assert_eq!(client.get(b"k", None).await.unwrap(), None, "the connection stays usable");
}

#[tokio::test]
async fn corrupt_frame_breaks_the_connection() {
    let cluster = FakeCluster::start(1).await;
    let client = Client::connect(cluster.seed(), ClientConfig { retries: 0, ..config() }).await.unwrap();
    client.put(b"k", b"v").await.unwrap();
    cluster.shards[0].behavior.corrupt_next.store(true, Ordering::SeqCst);
    let error = client.get(b"k", None).await.unwrap_err();
    let ClientError::ConnectionLost { reason, .. } = &error else { panic!("{error:?}") };
    assert!(reason.contains("checksum"), "{reason}");
    assert_eq!(client.get(b"k", None).await.unwrap().unwrap().value, &b"v"[..]);
}

#[tokio::test]
async fn oversized_requests_are_refused_locally() {
    let cluster = FakeCluster::start(1).await;
    let small = ClientConfig { frame_payload_bytes_max: 1024, ..config() };
    let client = Client::connect(cluster.seed(), small).await.unwrap();
    let error = client.put(b"k", &[0; 2000]).await.unwrap_err();
    assert!(matches!(error, ClientError::TooLarge { what: "request", max: 1024, .. }), "{error:?}");
    let long_key = vec![b'k'; usize::from(u16::MAX) + 1];
    let error = client.get(&long_key, None).await.unwrap_err();
    assert!(matches!(error, ClientError::TooLarge { what: "key", .. }), "{error:?}");
    let items: [(&[u8], &[u8]); 2] = [(b"a", &[0; 600]), (b"b", &[0; 600])];
    let error = client.batch_put(&items).await.unwrap_err();
    assert!(matches!(error, ClientError::TooLarge { .. }), "{error:?}");
    assert_eq!(cluster.shards[0].requests("Put") + cluster.shards[0].requests("BatchPut"), 0);
}

#[tokio::test]
async fn unreachable_seed_is_a_connect_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let error = Client::connect(&addr, ClientConfig { retries: 1, ..config() }).await.unwrap_err();
    assert!(matches!(&error, ClientError::Connect { addr: dialed, .. } if *dialed == addr), "{error:?}");
    assert_eq!(error.exit_code(), client::exit_code::UNAVAILABLE);
}

#[tokio::test]
async fn concurrent_callers_share_one_connection_per_shard() {
    let cluster = FakeCluster::start(2).await;
    let client = connect(&cluster).await;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..64 {
        let client = client.clone();
        tasks.spawn(async move {
            let key = format!("c/{index}");
            client.put(key.as_bytes(), key.as_bytes()).await.unwrap();
            client.get(key.as_bytes(), None).await.unwrap().unwrap().value == key.as_bytes()
        });
    }
    while let Some(joined) = tasks.join_next().await {
        assert!(joined.unwrap());
    }
    for shard in &cluster.shards {
        assert_eq!(shard.accepted.load(Ordering::SeqCst), 1, "shard {}", shard.id);
    }
}
