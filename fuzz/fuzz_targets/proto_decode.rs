//! Request and response bodies decode to a value or a typed error on any input, never panic,
//! and a decoded request re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::proto::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::decode(data) {
        let mut again = Vec::new();
        request.encode(&mut again);
        assert_eq!(again, data);
    }
    if let Ok(response) = Response::decode(data) {
        match response {
            Response::Listing { entries, .. } => assert_eq!(entries.iter().count(), entries.len()),
            Response::Hello { addresses, .. } => assert_eq!(addresses.iter().count(), addresses.len()),
            _ => {}
        }
    }
});
