//! Control-plane frames (QUIC stream payloads): any bytes give a request/response or a typed
//! error, never a panic; a decoded request re-encodes to a frame that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = controlplane::rpc::decode_request(data) {
        let frame = controlplane::rpc::encode_request(&request).expect("a decoded request re-encodes");
        assert!(controlplane::rpc::decode_request(&frame).is_ok());
    }
    let _ = controlplane::rpc::decode_response(data);
});
