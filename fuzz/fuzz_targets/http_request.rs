//! The metrics endpoint's request parser gives a route or a typed error on any input, never
//! panics, and never accepts a head longer than its limit.
#![no_main]

use platform::http::{self, HEAD_BYTES_MAX, HttpError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match http::parse(data) {
        Ok(_) => {
            let end = data.windows(4).position(|window| window == b"\r\n\r\n");
            assert!(end.is_some_and(|end| end <= HEAD_BYTES_MAX));
        }
        Err(HttpError::Incomplete) => assert!(data.len() < HEAD_BYTES_MAX),
        Err(_) => {}
    }
});
