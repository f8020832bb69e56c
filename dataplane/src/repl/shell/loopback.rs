//! What quinn alone carries on loopback with the replication's settings (`bench geo` reports
//! it beside iperf3 and the replication's own catch-up).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use platform::tls::Identity;

use super::{ALPN, endpoint, transport_config};

/// The longest [`loopback_ceiling`] waits for its bytes.
const LOOPBACK_CEILING_TIMEOUT: Duration = Duration::from_secs(120);

/// What this transport itself carries on loopback: `bytes` sent over one stream from an
/// endpoint of identity `sender` to one of `receiver` (both in `tls_dir`), with the
/// replication's mutual TLS, transport settings (`window_bytes`) and sockets, each endpoint on
/// a thread and runtime of its own as two nodes' would be. Nothing is compressed, logged or
/// applied. Returns MB/s from the first byte received to the last. `bench geo` reports it
/// beside iperf3's TCP and the replication's own catch-up.
///
/// # Errors
/// The identities cannot be loaded, a socket cannot be bound, the connection fails, or not
/// every byte arrives within [`LOOPBACK_CEILING_TIMEOUT`].
pub fn loopback_ceiling(
    tls_dir: &std::path::Path,
    sender: &str,
    receiver: &str,
    window_bytes: u64,
    bytes: u64,
) -> Result<f64, String> {
    let tls = |error: anyhow::Error| format!("loopback ceiling TLS: {error:#}");
    let server =
        Identity::in_dir(tls_dir, receiver).server_config_for(ALPN, transport_config(window_bytes)).map_err(tls)?;
    let client =
        Identity::in_dir(tls_dir, sender).client_config_for(ALPN, transport_config(window_bytes)).map_err(tls)?;
    let text = |error: &dyn std::fmt::Display| format!("loopback ceiling: {error}");
    let runtime =
        move || tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|error| text(&error));
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let receiving = std::thread::spawn(move || -> Result<f64, String> {
        runtime()?.block_on(async move {
            let bound = endpoint(Some(server), loopback).and_then(|listening| Ok((listening.local_addr()?, listening)));
            let _ = bound_tx.send(bound.as_ref().map(|(addr, _)| *addr).map_err(|error| text(error)));
            let (_, listening) = bound.map_err(|error| text(&error))?;
            // Bounded, so a sender that never connects cannot leave this thread waiting.
            let receive = async {
                let incoming = listening.accept().await.ok_or_else(|| text(&"endpoint closed"))?;
                let connection = incoming.await.map_err(|error| text(&error))?;
                let mut stream = connection.accept_uni().await.map_err(|error| text(&error))?;
                let (mut received, mut first) = (0u64, None);
                while let Some(chunk) = stream.read_chunk(usize::MAX, true).await.map_err(|error| text(&error))? {
                    first.get_or_insert_with(Instant::now);
                    received += chunk.bytes.len() as u64;
                }
                let seconds = first.map_or(0.0, |first: Instant| first.elapsed().as_secs_f64());
                connection.close(quinn::VarInt::from_u32(0), b"done");
                Ok::<_, String>((received, seconds))
            };
            let outcome = tokio::time::timeout(LOOPBACK_CEILING_TIMEOUT, receive).await;
            listening.close(quinn::VarInt::from_u32(0), b"done");
            listening.wait_idle().await;
            let (received, seconds) = outcome.map_err(|_| text(&"nothing received within the time limit"))??;
            if received != bytes {
                return Err(text(&format!("received {received} of {bytes} bytes")));
            }
            Ok(received as f64 / 1e6 / seconds.max(1e-9))
        })
    });
    let addr = bound_rx.recv().map_err(|_| text(&"the receiving thread ended early"))??;
    let sending = std::thread::spawn(move || -> Result<(), String> {
        runtime()?.block_on(async move {
            let mut dialing = endpoint(None, loopback).map_err(|error| text(&error))?;
            dialing.set_default_client_config(client);
            let connection = dialing
                .connect(addr, platform::tls::SERVER_NAME)
                .map_err(|error| text(&error))?
                .await
                .map_err(|error| text(&error))?;
            let mut stream = connection.open_uni().await.map_err(|error| text(&error))?;
            // One buffer handed to quinn again and again, as the shipper hands it batches.
            let piece = Bytes::from(vec![0x5Au8; 64 << 10]);
            let mut left = bytes;
            while left > 0 {
                let take = usize::try_from(left.min(piece.len() as u64)).unwrap_or(piece.len());
                stream.write_chunk(piece.slice(..take)).await.map_err(|error| text(&error))?;
                left -= take as u64;
            }
            stream.finish().map_err(|error| text(&error))?;
            connection.closed().await;
            Ok(())
        })
    });
    let sent = sending.join().map_err(|_| text(&"the sending thread panicked"))?;
    let received = receiving.join().map_err(|_| text(&"the receiving thread panicked"))?;
    sent?;
    received
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_ceiling_delivers_every_byte_and_names_a_missing_identity() {
        let dir = tempfile::tempdir().unwrap();
        platform::tls::generate(dir.path(), &["a".into(), "b".into()]).unwrap();
        let rate = loopback_ceiling(dir.path(), "a", "b", 1 << 20, 3 << 20).unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        let error = loopback_ceiling(dir.path(), "a", "nobody", 1 << 20, 1 << 20).unwrap_err();
        assert!(error.contains("nobody"), "{error}");
    }
}
