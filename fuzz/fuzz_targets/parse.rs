//! Fuzz target: `kiln_syntax::parse` on arbitrary bytes (as lossy UTF-8) must not panic,
//! and every diagnostic's spans must lie inside the input.

#![no_main]

use kiln_syntax::{parse, FileId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let (_file, diagnostics) = parse(&source, FileId(0));
    for diagnostic in &diagnostics {
        for label in &diagnostic.labels {
            let (start, end) = (label.span.start as usize, label.span.end as usize);
            assert!(
                start <= end && end <= source.len(),
                "diagnostic `{}` has span {start}..{end} outside 0..{}",
                diagnostic.message,
                source.len()
            );
        }
    }
});
