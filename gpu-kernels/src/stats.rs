//! Per-kernel statistics of a compiled function: the graph ops fused into each kernel and
//! the minimum bytes it must move (each buffer it touches read or written once), grouped
//! per decoder layer when its weights name one (`model.layers.{i}.`), printable as the
//! table `kiln compile --stats` shows.

use kiln_kir::SizeExpr;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One launch of a kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelStats {
    pub function: String,
    /// Index into the package's kernels.
    pub kernel: usize,
    pub name: String,
    /// The decoder layer, when its weights (or the kernels it reads from) name one.
    pub layer: Option<usize>,
    /// Names of the graph ops computed in it, in program order.
    pub ops: Vec<String>,
    /// Bytes read + written, every buffer once.
    pub bytes: SizeExpr,
}

/// The statistics of every launch of a function or module, in run order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub launches: Vec<KernelStats>,
}

impl Stats {
    /// Launches per decoder layer (`None`: outside any layer), per function.
    pub fn kernels_per_layer(&self, function: &str) -> BTreeMap<Option<usize>, usize> {
        let mut counts = BTreeMap::new();
        for k in self.launches.iter().filter(|k| k.function == function) {
            *counts.entry(k.layer).or_insert(0) += 1;
        }
        counts
    }

    /// The table: one row per launch, then per-layer and per-function totals; bytes are
    /// evaluated with `symbols` (shown symbolically where a symbol is missing).
    pub fn table(&self, symbols: &BTreeMap<String, u64>) -> String {
        let eval = |s: &SizeExpr| s.eval(&|n: &str| symbols.get(n).copied());
        let mut out = String::new();
        let mut functions: Vec<&str> = Vec::new();
        for k in &self.launches {
            if !functions.contains(&k.function.as_str()) {
                functions.push(&k.function);
            }
        }
        for f in functions {
            let _ = writeln!(out, "@{f}");
            let _ = writeln!(
                out,
                "{:>3}  {:<32} {:>5}  {:>12}  ops",
                "#", "kernel", "layer", "bytes"
            );
            let mut per_layer: BTreeMap<Option<usize>, (usize, Option<u64>)> = BTreeMap::new();
            let mut total: Option<u64> = Some(0);
            for (i, k) in self.launches.iter().filter(|k| k.function == f).enumerate() {
                let bytes = eval(&k.bytes);
                let shown = bytes.map_or_else(|| k.bytes.to_string(), |b| b.to_string());
                let layer = k.layer.map_or_else(|| "-".to_string(), |l| l.to_string());
                let _ = writeln!(
                    out,
                    "{i:>3}  {:<32} {layer:>5}  {shown:>12}  {}",
                    k.name,
                    summarize(&k.ops)
                );
                let e = per_layer.entry(k.layer).or_insert((0, Some(0)));
                e.0 += 1;
                e.1 = e.1.zip(bytes).map(|(a, b)| a + b);
                total = total.zip(bytes).map(|(a, b)| a + b);
            }
            for (layer, (count, bytes)) in &per_layer {
                let name =
                    layer.map_or_else(|| "outside layers".to_string(), |l| format!("layer {l}"));
                let bytes = bytes.map_or_else(|| "?".to_string(), |b| b.to_string());
                let _ = writeln!(out, "     {name}: {count} kernels, {bytes} bytes");
            }
            let count = self.launches.iter().filter(|k| k.function == f).count();
            let total = total.map_or_else(|| "?".to_string(), |b| b.to_string());
            let _ = writeln!(out, "     total: {count} kernels, {total} bytes");
        }
        out
    }
}

/// `mul×3 add rsqrt` style: op names with repeat counts, in first-seen order.
fn summarize(ops: &[String]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for o in ops {
        match counts.iter_mut().find(|(n, _)| n == o) {
            Some(c) => c.1 += 1,
            None => counts.push((o, 1)),
        }
    }
    counts
        .iter()
        .map(|(n, c)| {
            if *c > 1 {
                format!("{n}×{c}")
            } else {
                (*n).to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
