//! A flotilla file (TOML) of any content: `parse_file` returns the file or located errors, and
//! never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = flotilla_spec::parse_file(text, "f.toml") {
        // Rendering the errors (file:line:col) is part of what a user sees.
        let _ = errors.to_string();
    }
});
