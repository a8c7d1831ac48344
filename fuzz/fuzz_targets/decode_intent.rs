//! Fuzzes `concord_proto::decode_intent`, the decoder of every intent an
//! agent sends over the bus: it must never panic, and whatever it accepts
//! must survive encoding and decoding unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    concord_fuzz::decode_round_trip(data);
});
