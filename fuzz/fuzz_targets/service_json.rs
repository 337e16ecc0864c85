//! A Service object (or bare spec) as the API receives it, as JSON: parsing and validation never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(errors) = flotilla_spec::parse_service_object_json(data) {
        let _ = errors.to_string();
    }
    let _ = flotilla_spec::parse_service_json(data);
});
