//! Loading a program: parsing the root file and every module it imports (the stdlib is
//! embedded in the compiler; other modules are `.kiln` files next to the importer).

use kiln_syntax::ast::{self, Item, Span};
use kiln_syntax::{Diagnostic, FileId, SourceMap};
use std::path::{Path, PathBuf};

/// The standard library, embedded so the compiler needs no files at run time.
const STDLIB: &[(&str, &str)] = &[
    ("nn", include_str!("../../../stdlib/nn.kiln")),
    ("consensus", include_str!("../../../stdlib/consensus.kiln")),
];

/// The source of a stdlib module, by its import name.
pub fn stdlib_source(name: &str) -> Option<&'static str> {
    STDLIB.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Names of every stdlib module.
pub fn stdlib_modules() -> impl Iterator<Item = &'static str> {
    STDLIB.iter().map(|(n, _)| *n)
}

/// One parsed file of a program.
#[derive(Debug)]
pub struct ParsedFile {
    pub id: FileId,
    /// The module name it was imported as (`None` for the root file).
    pub module: Option<String>,
    pub ast: ast::File,
}

/// A root file and everything it imports, parsed.
pub struct Program {
    pub sources: SourceMap,
    pub files: Vec<ParsedFile>,
}

impl Program {
    pub fn root(&self) -> &ParsedFile {
        &self.files[0]
    }

    /// Parses `source` (named `name` in diagnostics) and its imports. Imports that are not
    /// stdlib modules are looked up as `<module>.kiln` in `dir`, when given.
    pub fn load_source(name: &str, source: &str, dir: Option<&Path>) -> (Program, Vec<Diagnostic>) {
        let mut program = Program {
            sources: SourceMap::new(),
            files: Vec::new(),
        };
        let mut diags = Vec::new();
        let root = program.sources.add(name, source);
        let (file, mut d) = kiln_syntax::parse(source, root);
        diags.append(&mut d);
        program.files.push(ParsedFile {
            id: root,
            module: None,
            ast: file,
        });
        // Breadth-first over imports; each module is loaded once.
        let mut next = 0;
        while next < program.files.len() {
            let importer = program.files[next].id;
            let imports: Vec<(String, Span)> = program.files[next]
                .ast
                .items
                .iter()
                .filter_map(|item| match item {
                    Item::Import { path, span } => Some((
                        path.iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join("."),
                        *span,
                    )),
                    _ => None,
                })
                .collect();
            for (module, span) in imports {
                if program
                    .files
                    .iter()
                    .any(|f| f.module.as_deref() == Some(module.as_str()))
                {
                    continue;
                }
                let text = match stdlib_source(&module) {
                    Some(text) => Some((format!("stdlib/{module}.kiln"), text.to_string())),
                    None => dir.and_then(|dir| {
                        let path: PathBuf = dir.join(format!("{}.kiln", module.replace('.', "/")));
                        std::fs::read_to_string(&path)
                            .ok()
                            .map(|t| (path.display().to_string(), t))
                    }),
                };
                match text {
                    Some((file_name, text)) => {
                        let id = program.sources.add(file_name, text);
                        let (file, mut d) = kiln_syntax::parse(program.sources.source(id), id);
                        diags.append(&mut d);
                        program.files.push(ParsedFile {
                            id,
                            module: Some(module),
                            ast: file,
                        });
                    }
                    None => {
                        let known: Vec<&str> = stdlib_modules().collect();
                        diags.push(
                            Diagnostic::error(format!("cannot find module `{module}`"))
                                .with_label(importer, span, "imported here")
                                .with_note(format!(
                                    "the stdlib has: {}; other modules are read from `{}.kiln` next to the importing file",
                                    known.join(", "),
                                    module.replace('.', "/")
                                )),
                        );
                    }
                }
            }
            next += 1;
        }
        (program, diags)
    }

    /// Reads and loads the program in the file at `path`.
    pub fn load(path: &Path) -> std::io::Result<(Program, Vec<Diagnostic>)> {
        let source = std::fs::read_to_string(path)?;
        Ok(Program::load_source(
            &path.display().to_string(),
            &source,
            path.parent(),
        ))
    }
}
