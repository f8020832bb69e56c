//! ClockBound's shared-memory segment: any bytes give a reading or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reading) = controlapi::glts::clockbound::decode(data) {
        let _ = reading.bound_at(reading.as_of_ns);
    }
});
