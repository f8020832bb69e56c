//! Control-plane frames (QUIC stream payloads): any bytes give a request/response or a typed
//! error, never a panic; a decoded request re-encodes to a frame that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use controlplane::rpc::{Incoming, Outgoing};
    if let Ok(request) = controlapi::rpc::decode::<Incoming>(data) {
        let frame = controlapi::rpc::encode(&request, 0).expect("a decoded request re-encodes");
        assert!(controlapi::rpc::decode::<Incoming>(&frame).is_ok());
    }
    let _ = controlapi::rpc::decode::<Outgoing>(data);
});
