//! The thread-per-core runtime: shards on their own executors exchange messages over the
//! bounded mesh, and keys are routed to the shard that owns them.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_lossless)]

use dataplane::runtime::{RuntimeConfig, RuntimeError, run_shards};

#[test]
fn every_shard_reaches_every_other_and_owners_check_keys() {
    let config = RuntimeConfig { shards: 3, mesh_channel_capacity: 4, ..RuntimeConfig::default() };
    let keys_per_sender = 200_usize;
    let results = run_shards::<(u32, Vec<u8>), _, _, _>(&config, move |mut context| async move {
        let receivers = context.take_receivers();
        let shard_id = context.shard_id;
        let shard_count = context.shard_count;
        // Receive on every incoming channel concurrently while sending.
        let mut tasks = Vec::new();
        for (peer, receiver) in receivers {
            tasks.push(glommio::spawn_local(async move {
                let mut got = Vec::new();
                while let Some((from, key)) = receiver.recv().await {
                    assert_eq!(from, peer);
                    got.push(key);
                }
                got
            }));
        }
        let mut local = 0_usize;
        for index in 0..keys_per_sender * shard_count as usize {
            let key = format!("s{shard_id}-k{index}").into_bytes();
            let owner = wire::shard_for(&key, shard_count);
            if owner == shard_id {
                assert!(context.owns(&key));
                local += 1;
            } else {
                // Capacity 4: this waits whenever the owner lags (backpressure).
                context.send_to(owner, (shard_id, key)).await.unwrap();
            }
        }
        assert!(matches!(context.send_to(shard_id, (0, vec![])).await, Err(RuntimeError::Send(_))));
        context.close_senders();
        let mut received = Vec::new();
        for task in tasks {
            received.extend(task.await);
        }
        for key in &received {
            assert_eq!(wire::shard_for(key, shard_count), shard_id, "only owned keys arrive");
        }
        (local, received.len())
    })
    .unwrap();
    let total: usize = results.iter().map(|(local, received)| local + received).sum();
    assert_eq!(total, keys_per_sender * 3 * 3);
}

#[test]
fn invalid_runtime_config_names_the_field() {
    let config = RuntimeConfig { shards: 0, ..RuntimeConfig::default() };
    match run_shards::<(), _, _, _>(&config, |_| async {}) {
        Err(RuntimeError::Config { field, .. }) => assert_eq!(field, "shards"),
        other => panic!("{other:?}"),
    }
}
