//! The checks behind concord's fuzz targets.
//!
//! Kept free of libFuzzer so that ordinary stable tests can run them too:
//! `crates/concord-proto/tests/fuzz_corpus.rs` includes this file by path and
//! replays the seed corpus through [`decode_round_trip`]. Use only
//! `concord_proto` and `serde_json` here.

use concord_proto::limits::INTENT_BYTES_MAX;
use concord_proto::{Intent, Rule, decode_intent};

/// Decodes `data` as an intent from the bus. When it decodes, the intent must
/// validate, encode, and decode again to an equal intent whose encoding is
/// the same bytes. Returns the decoded intent; panics (the fuzzer's failure
/// signal) when any of that does not hold. `decode_intent` itself must never
/// panic, whatever the bytes.
pub fn decode_round_trip(data: &[u8]) -> Option<Intent> {
    let intent = decode_intent(data).ok()?;
    if let Err(e) = intent.validate() {
        panic!("decoded intent fails validation: {e}");
    }
    let encoded = serde_json::to_vec(&intent).expect("a decoded intent encodes");
    let again: Result<Intent, String> = if encoded.len() <= INTENT_BYTES_MAX {
        decode_intent(&encoded).map_err(|e| e.to_string())
    } else {
        // The encoding can be longer than the input that decoded (`1` is
        // written `1.0`, defaults are written out). Past the payload limit
        // decode_intent must refuse it for its size alone, and the same bytes
        // decoded without the size check must give the same intent.
        let refused = decode_intent(&encoded).expect_err("an oversize encoding is refused");
        assert_eq!(refused.rule, Rule::PayloadBytesMax, "oversize encoding: {refused}");
        serde_json::from_slice::<Intent>(&encoded)
            .map_err(|e| e.to_string())
            .and_then(|i| i.validate().map(|()| i).map_err(|e| e.to_string()))
    };
    match again {
        Ok(again) => {
            assert_eq!(
                again,
                intent,
                "re-decoded intent differs; encoding: {}",
                String::from_utf8_lossy(&encoded)
            );
            let reencoded = serde_json::to_vec(&again).expect("a decoded intent encodes");
            assert_eq!(reencoded, encoded, "encoding is not canonical");
        }
        Err(e) => panic!(
            "re-encoded intent does not decode: {e}; encoding: {}",
            String::from_utf8_lossy(&encoded)
        ),
    }
    Some(intent)
}
