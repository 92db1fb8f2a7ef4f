//! Snapshot tests of rendered diagnostics: every `tests/errors/*.kiln` program is parsed and
//! its diagnostics, rendered as a person sees them, compared with
//! `tests/snapshots/diagnostics__<name>.snap` (re-bless with `INSTA_UPDATE=always`).

use kiln_syntax::{parse, FileId, SourceMap};
use std::path::Path;

#[test]
fn malformed_programs_report_actionable_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("read tests/errors")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "kiln"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 15, "expected at least 15 error programs");
    for path in paths {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(&path).expect("read error program");
        let (_, diagnostics) = parse(&source, FileId(0));
        assert!(!diagnostics.is_empty(), "{name}: no diagnostics");
        let mut map = SourceMap::new();
        map.add(format!("{name}.kiln"), source);
        insta::assert_snapshot!(name, map.render(&diagnostics));
    }
}
