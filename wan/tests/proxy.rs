//! The proxy on real UDP sockets: an echo server behind it sees the configured delay each way,
//! nothing passes while partitioned, traffic resumes on heal, and loss drops datagrams.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use wan::{LinkConfig, Proxy};

async fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0; 2048];
        while let Ok((len, from)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..len], from).await;
        }
    });
    addr
}

/// Sends `payload` and waits up to `within` for its echo; the round trip.
async fn round_trip(client: &UdpSocket, payload: &[u8], within: Duration) -> Option<Duration> {
    let start = Instant::now();
    client.send(payload).await.unwrap();
    let mut buffer = vec![0; 2048];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        let len = tokio::time::timeout(left, client.recv(&mut buffer)).await.ok()?.unwrap();
        if &buffer[..len] == payload {
            return Some(start.elapsed());
        }
    }
}

#[tokio::test]
async fn delay_partition_heal_and_loss_through_real_sockets() {
    let upstream = echo_server().await;
    let link = LinkConfig::with_delay(Duration::from_millis(20));
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream, link, link, 7).await.unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(proxy.addr()).await.unwrap();

    for i in 0..5_u8 {
        let rtt = round_trip(&client, &[i; 100], Duration::from_secs(2)).await.expect("echo through the proxy");
        assert!(rtt >= Duration::from_millis(40), "round trip {rtt:?} shorter than 2 x 20 ms");
        assert!(rtt < Duration::from_millis(500), "round trip {rtt:?}");
    }

    let handle = proxy.handle();
    handle.partition(true);
    assert_eq!(round_trip(&client, b"cut", Duration::from_millis(300)).await, None, "passed a partition");
    handle.partition(false);
    assert!(round_trip(&client, b"healed", Duration::from_secs(2)).await.is_some(), "no traffic after heal");
    let (forward, _) = handle.stats();
    assert!(forward.partitioned >= 1 && forward.delivered >= 6, "{forward:?}");

    // Half the datagrams lost each way: about a quarter of the echoes come back.
    let lossy = LinkConfig { loss: 0.5, ..LinkConfig::default() };
    handle.set(lossy, lossy).unwrap();
    let mut answered = 0;
    for i in 0..100_u32 {
        if round_trip(&client, &i.to_le_bytes(), Duration::from_millis(25)).await.is_some() {
            answered += 1;
        }
    }
    assert!((8..=50).contains(&answered), "{answered} of 100 echoes with 50% loss each way");
    assert!(handle.set(LinkConfig { loss: 2.0, ..lossy }, lossy).is_err());
}
