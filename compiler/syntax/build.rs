//! Generates the parser from `src/grammar.lalrpop` with LALRPOP.

fn main() {
    lalrpop::Configuration::new()
        .use_cargo_dir_conventions()
        .emit_rerun_directives(true)
        .process()
        .expect("generate the parser from src/grammar.lalrpop");
}
