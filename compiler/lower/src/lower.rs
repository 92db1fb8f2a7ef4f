//! The lowering driver: binds the config, resolves model params, picks the entry functions
//! and evaluates their bodies (inlining every call) into graph-IR functions.
//!
//! Evaluation is a tree walk over the AST producing [`Val`]s: compile-time values are folded
//! on the spot, tensors become IR instructions appended through a [`Builder`]. An error
//! records a diagnostic and evaluates to [`Val::Poison`], which later steps accept silently,
//! so one run reports every independent error.

use crate::config::{self, ConfigType};
use crate::program::Program;
use crate::value::{ConfigValue, ParamId, Val};
use indexmap::IndexMap;
use kiln_ir::{Builder, DType, Dim, Function, Module, Op, Shape, TensorType, Value};
use kiln_syntax::ast::{self, Block, Expr, ExprKind, FnDef, Item, ModelItem, Pat, Span, Stmt};
use kiln_syntax::{Diagnostic, FileId};
use serde_json::Value as Json;

/// Choices that are not part of the program text.
#[derive(Clone, Debug)]
pub struct Options {
    /// The dtype of params whose declaration names none.
    pub param_dtype: DType,
    /// Lower only these entry functions (all of the root file's when `None`).
    pub entries: Option<Vec<String>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            param_dtype: DType::F32,
            entries: None,
        }
    }
}

/// A checkpoint tensor that the lowered functions read.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamBinding {
    /// The tensor's name in the checkpoint (layer patterns substituted).
    pub checkpoint_name: String,
    pub ty: TensorType,
    /// The params declared in the program that read it (more than one when tied).
    pub declared_as: Vec<String>,
}

/// The result of lowering a program.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub module: Module,
    pub config: IndexMap<String, ConfigValue>,
    pub params: Vec<ParamBinding>,
}

/// Where a model param's value comes from.
#[derive(Clone, Debug)]
enum ParamSource {
    Checkpoint(String),
    Tied(ParamId),
}

struct ParamInfo<'p> {
    file: FileId,
    decl: &'p ast::ParamDecl,
    /// The layer index for params declared in a `layers` block.
    layer: Option<i64>,
    ty: Option<TensorType>,
    source: Option<ParamSource>,
}

#[derive(Clone, Copy)]
struct FnInfo<'p> {
    file: FileId,
    def: &'p FnDef,
    in_model: bool,
}

/// State shared by every function being lowered.
pub(crate) struct Globals<'p> {
    program: &'p Program,
    fns: IndexMap<String, FnInfo<'p>>,
    modules: Vec<String>,
    config: IndexMap<String, ConfigValue>,
    params: Vec<ParamInfo<'p>>,
    top_params: IndexMap<String, ParamId>,
    /// Per-layer params by name: one id per layer index, starting at `layer_start`.
    layer_params: IndexMap<String, Vec<ParamId>>,
    layer_start: i64,
    layer_end: i64,
    layer_var: Option<String>,
    bindings: IndexMap<String, ParamBinding>,
    options: Options,
    pub(crate) diags: Vec<Diagnostic>,
}

/// One inlined function call (or the entry function itself).
pub(crate) struct Frame<'p> {
    pub(crate) file: FileId,
    scopes: Vec<IndexMap<String, Val>>,
    in_model: bool,
    layer: Option<i64>,
    /// Where the call was made and the callee's name, for diagnostics.
    call_site: Option<(FileId, Span, String)>,
    def: Option<&'p FnDef>,
}

/// Lowers one function body: the evaluator.
pub(crate) struct Cx<'g, 'p, 'f> {
    pub(crate) g: &'g mut Globals<'p>,
    pub(crate) b: Builder<'f>,
    pub(crate) frames: Vec<Frame<'p>>,
    region_depth: usize,
    param_cache: Vec<(ParamId, usize, Value)>,
}

/// A call argument after evaluation.
pub(crate) struct ArgVal {
    pub(crate) name: Option<String>,
    pub(crate) value: Val,
    pub(crate) span: Span,
}

const MAX_CALL_DEPTH: usize = 64;

/// Lowers the entry functions of `program` with config values read from `config_json`.
/// Returns the lowered module when there were no errors, and every diagnostic.
pub fn lower(
    program: &Program,
    config_json: Option<&Json>,
    options: &Options,
) -> (Option<Lowered>, Vec<Diagnostic>) {
    let mut g = Globals {
        program,
        fns: IndexMap::new(),
        modules: program
            .files
            .iter()
            .filter_map(|f| f.module.clone())
            .collect(),
        config: IndexMap::new(),
        params: Vec::new(),
        top_params: IndexMap::new(),
        layer_params: IndexMap::new(),
        layer_start: 0,
        layer_end: 0,
        layer_var: None,
        bindings: IndexMap::new(),
        options: options.clone(),
        diags: Vec::new(),
    };
    g.collect_items();
    g.bind_config(config_json);
    g.resolve_params();
    let module = g.lower_entries();
    let diags = std::mem::take(&mut g.diags);
    if diags.iter().any(Diagnostic::is_error) {
        return (None, diags);
    }
    let lowered = Lowered {
        module,
        config: g.config,
        params: g.bindings.into_values().collect(),
    };
    (Some(lowered), diags)
}

impl<'p> Globals<'p> {
    fn error(&mut self, file: FileId, span: Span, message: impl Into<String>, label: &str) {
        self.diags
            .push(Diagnostic::error(message).with_label(file, span, label));
    }

    /// Gathers functions and model declarations from every file.
    fn collect_items(&mut self) {
        let program = self.program;
        let mut models = 0;
        for file in &program.files {
            for item in &file.ast.items {
                match item {
                    Item::Fn(def) => self.add_fn(file.id, def, false),
                    Item::Model(model) if file.module.is_none() => {
                        models += 1;
                        if models > 1 {
                            self.error(
                                file.id,
                                model.name.span,
                                "a program may define only one model",
                                "second model",
                            );
                            continue;
                        }
                        for mitem in &model.items {
                            match mitem {
                                ModelItem::Fn(def) => self.add_fn(file.id, def, true),
                                ModelItem::Param(decl) => {
                                    let id = self.add_param(file.id, decl, None);
                                    if self.top_params.contains_key(&decl.name.name) {
                                        self.error(
                                            file.id,
                                            decl.name.span,
                                            format!("param `{}` is declared twice", decl.name.name),
                                            "declared again here",
                                        );
                                    }
                                    self.top_params.insert(decl.name.name.clone(), id);
                                }
                                ModelItem::Layers(_) => {}
                            }
                        }
                    }
                    Item::Model(model) => self.error(
                        file.id,
                        model.name.span,
                        "models can only be defined in the root file, not in an imported module",
                        "model in a module",
                    ),
                    Item::Import { .. } | Item::Config(_) => {}
                }
            }
        }
    }

    fn add_fn(&mut self, file: FileId, def: &'p FnDef, in_model: bool) {
        if let Some(prev) = self.fns.get(&def.name.name) {
            let prev_file = prev.file;
            let prev_span = prev.def.name.span;
            self.diags.push(
                Diagnostic::error(format!("function `{}` is defined twice", def.name.name))
                    .with_label(file, def.name.span, "defined again here")
                    .with_label(prev_file, prev_span, "first defined here"),
            );
            return;
        }
        self.fns.insert(
            def.name.name.clone(),
            FnInfo {
                file,
                def,
                in_model,
            },
        );
    }

    fn add_param(&mut self, file: FileId, decl: &'p ast::ParamDecl, layer: Option<i64>) -> ParamId {
        self.params.push(ParamInfo {
            file,
            decl,
            layer,
            ty: None,
            source: None,
        });
        ParamId(self.params.len() as u32 - 1)
    }

    /// Binds every config field, in declaration order, from the JSON or its default.
    fn bind_config(&mut self, json: Option<&Json>) {
        let program = self.program;
        let mut scratch = Function::new("<config>");
        for file in &program.files {
            for item in &file.ast.items {
                let Item::Config(block) = item else { continue };
                for field in &block.fields {
                    let Some(ty) = ConfigType::from_name(&field.ty.name) else {
                        self.error(
                            file.id,
                            field.ty.span,
                            format!(
                                "unknown config type `{}`; use int, float, bool or str",
                                field.ty.name
                            ),
                            "unknown type",
                        );
                        continue;
                    };
                    let key = field
                        .json_path
                        .as_ref()
                        .map(|p| p.value.clone())
                        .unwrap_or_else(|| field.name.name.clone());
                    let from_json = json.and_then(|j| config::lookup(j, &key));
                    let value = match from_json {
                        Some((found, path)) => match ty.from_json(found) {
                            Ok(v) => Some(v),
                            Err(why) => {
                                self.error(
                                    file.id,
                                    field.name.span,
                                    format!("config key `{path}`: {why}"),
                                    format!("declared as {} here", ty.name()).as_str(),
                                );
                                None
                            }
                        },
                        None => match &field.default {
                            Some(default) => {
                                let v = {
                                    let mut cx = Cx::new(self, &mut scratch, file.id, false);
                                    cx.expr(default)
                                };
                                match const_config_value(&v).and_then(|c| ty.coerce(c)) {
                                    Some(c) => Some(c),
                                    None => {
                                        if v != Val::Poison {
                                            self.error(
                                                file.id,
                                                default.span,
                                                format!(
                                                    "the default of `{}` must be a {}, found {}",
                                                    field.name.name,
                                                    ty.name(),
                                                    v.describe()
                                                ),
                                                "default here",
                                            );
                                        }
                                        None
                                    }
                                }
                            }
                            None => {
                                let msg = match json {
                                    Some(_) => format!(
                                        "config key `{}` is missing from the config and `{}` has no default",
                                        key.replace('|', "` or `"),
                                        field.name.name
                                    ),
                                    None => format!(
                                        "`{}` has no default and no config was given (pass --config config.json)",
                                        field.name.name
                                    ),
                                };
                                self.error(file.id, field.name.span, msg, "required here");
                                None
                            }
                        },
                    };
                    if let Some(v) = value {
                        self.config.insert(field.name.name.clone(), v);
                    }
                }
            }
        }
    }

    /// Evaluates every param declaration's type and source once, up front, so bad
    /// patterns and shapes are reported even for params no function uses.
    fn resolve_params(&mut self) {
        let program = self.program;
        let mut scratch = Function::new("<params>");
        let root = program.root();
        // Layer params first need the layer range.
        for item in &root.ast.items {
            let Item::Model(model) = item else { continue };
            for mitem in &model.items {
                let ModelItem::Layers(layers) = mitem else {
                    continue;
                };
                if self.layer_var.is_some() {
                    self.error(
                        root.id,
                        layers.span,
                        "a model may have only one `layers` block",
                        "second block",
                    );
                    continue;
                }
                let (start, end) = {
                    let mut cx = Cx::new(self, &mut scratch, root.id, false);
                    let s = cx.expr(&layers.start);
                    let e = cx.expr(&layers.end);
                    (s, e)
                };
                let (Val::Int(start), Val::Int(end)) = (start.clone(), end.clone()) else {
                    if start != Val::Poison && end != Val::Poison {
                        self.error(
                            root.id,
                            layers.start.span.to(layers.end.span),
                            format!(
                                "the layer range must be two integers known at compile time, found {} and {}",
                                start.describe(),
                                end.describe()
                            ),
                            "layer range",
                        );
                    }
                    continue;
                };
                self.layer_start = start;
                self.layer_end = end.max(start);
                self.layer_var = Some(layers.index.name.clone());
                for decl in &layers.params {
                    let ids = (start..end.max(start))
                        .map(|l| self.add_param(root.id, decl, Some(l)))
                        .collect::<Vec<_>>();
                    if self.layer_params.contains_key(&decl.name.name)
                        || self.top_params.contains_key(&decl.name.name)
                    {
                        self.error(
                            root.id,
                            decl.name.span,
                            format!("param `{}` is declared twice", decl.name.name),
                            "declared again here",
                        );
                    }
                    self.layer_params.insert(decl.name.name.clone(), ids);
                }
            }
        }
        // Types and sources. Only the first layer of a layers param reports errors, so a
        // bad pattern is reported once, not once per layer.
        for index in 0..self.params.len() {
            let (file, decl, layer) = {
                let p = &self.params[index];
                (p.file, p.decl, p.layer)
            };
            let report = layer.is_none_or(|l| l == self.layer_start);
            let saved = self.diags.len();
            let (ty, source) = {
                let mut cx = Cx::new(self, &mut scratch, file, true);
                if let (Some(l), Some(var)) = (layer, cx.g.layer_var.clone()) {
                    cx.frames[0].layer = Some(l);
                    cx.bind(&var, Val::Int(l));
                }
                let ty = cx.param_type(decl);
                let source = cx.expr(&decl.source);
                (ty, source)
            };
            let source = match source {
                Val::Str(pattern) => self
                    .substitute_pattern(&pattern, layer, file, decl.source.span)
                    .map(ParamSource::Checkpoint),
                Val::Param(other) => Some(ParamSource::Tied(other)),
                Val::Poison => None,
                other => {
                    self.error(
                        file,
                        decl.source.span,
                        format!(
                            "a param's source must be a checkpoint name (a string) or another param, found {}",
                            other.describe()
                        ),
                        "param source",
                    );
                    None
                }
            };
            if !report {
                self.diags.truncate(saved);
            }
            self.params[index].ty = ty;
            self.params[index].source = source;
        }
    }

    /// Replaces `{L}` (the layers block's index name) in a checkpoint-name pattern.
    fn substitute_pattern(
        &mut self,
        pattern: &str,
        layer: Option<i64>,
        file: FileId,
        span: Span,
    ) -> Option<String> {
        let mut out = String::new();
        let mut rest = pattern;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                self.error(
                    file,
                    span,
                    format!("unclosed `{{` in the param name pattern {pattern:?}"),
                    "in this pattern",
                );
                return None;
            };
            let var = &after[..close];
            match (layer, &self.layer_var) {
                (Some(l), Some(name)) if name == var => out.push_str(&l.to_string()),
                (Some(_), Some(name)) => {
                    let name = name.clone();
                    self.error(
                        file,
                        span,
                        format!(
                            "unknown pattern `{{{var}}}` in the param name {pattern:?}; only `{{{name}}}`, the layer index, can be substituted"
                        ),
                        "in this pattern",
                    );
                    return None;
                }
                _ => {
                    self.error(
                        file,
                        span,
                        format!(
                            "the param name {pattern:?} has a pattern `{{{var}}}`, but this param is not declared inside a `layers` block"
                        ),
                        "in this pattern",
                    );
                    return None;
                }
            }
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Some(out)
    }

    /// Lowers each entry function of the root file.
    fn lower_entries(&mut self) -> Module {
        let mut module = Module::default();
        let root = self.program.root();
        let entries: Vec<FnInfo<'p>> = self
            .fns
            .values()
            .filter(|info| info.file == root.id && is_concrete(info.def))
            .copied()
            .collect();
        if let Some(wanted) = self.options.entries.clone() {
            for name in &wanted {
                if !entries.iter().any(|e| &e.def.name.name == name) {
                    let known: Vec<&str> =
                        entries.iter().map(|e| e.def.name.name.as_str()).collect();
                    self.diags.push(Diagnostic::error(format!(
                        "no entry function `{name}` (entry functions have fully typed parameters; this program has: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    )));
                }
            }
        }
        for info in entries {
            if let Some(wanted) = &self.options.entries {
                if !wanted.contains(&info.def.name.name) {
                    continue;
                }
            }
            let mut func = Function::new(info.def.name.name.clone());
            let ok = {
                let mut cx = Cx::new(self, &mut func, info.file, info.in_model);
                cx.frames[0].def = Some(info.def);
                cx.lower_entry(info.def)
            };
            if ok {
                if cfg!(debug_assertions) {
                    if let Err(e) = kiln_ir::verify::verify_function(&func) {
                        panic!(
                            "lowering produced invalid IR for `{}`: {e}\n{func}",
                            func.name
                        );
                    }
                }
                module.functions.push(func);
            }
        }
        module
    }
}

/// An entry function has every parameter typed with a dtype and no `...`.
fn is_concrete(def: &FnDef) -> bool {
    def.params.iter().all(|p| match &p.ty {
        Some(ast::Type::Tensor { dtype, dims, .. }) => {
            dtype.is_some() && dims.iter().all(|d| !matches!(d, ast::DimExpr::Ellipsis(_)))
        }
        Some(ast::Type::Named(id)) => scalar_input_dtype(&id.name).is_some(),
        _ => false,
    })
}

/// The dtype of a scalar entry parameter declared as `name`.
fn scalar_input_dtype(name: &str) -> Option<DType> {
    match name {
        "int" => Some(DType::I64),
        "float" => Some(DType::F32),
        _ => DType::from_name(name),
    }
}

fn const_config_value(v: &Val) -> Option<ConfigValue> {
    match v {
        Val::Int(i) => Some(ConfigValue::Int(*i)),
        Val::Float(f) => Some(ConfigValue::Float(*f)),
        Val::Bool(b) => Some(ConfigValue::Bool(*b)),
        Val::Str(s) => Some(ConfigValue::Str(s.clone())),
        _ => None,
    }
}

impl<'g, 'p, 'f> Cx<'g, 'p, 'f> {
    fn new(g: &'g mut Globals<'p>, func: &'f mut Function, file: FileId, in_model: bool) -> Self {
        Cx {
            g,
            b: Builder::new(func),
            frames: vec![Frame {
                file,
                scopes: vec![IndexMap::new()],
                in_model,
                layer: None,
                call_site: None,
                def: None,
            }],
            region_depth: 0,
            param_cache: Vec::new(),
        }
    }

    fn frame(&mut self) -> &mut Frame<'p> {
        self.frames.last_mut().expect("a frame")
    }

    /// Records an error at `span` in the current file, with the chain of calls that led
    /// here, and returns [`Val::Poison`].
    pub(crate) fn err(&mut self, span: Span, message: impl Into<String>) -> Val {
        let file = self.frames.last().expect("a frame").file;
        let mut d = Diagnostic::error(message).with_label(file, span, "");
        for frame in self.frames.iter().rev().take(4) {
            if let Some((file, span, name)) = &frame.call_site {
                d = d.with_label(*file, *span, format!("in this call to `{name}`"));
            }
        }
        self.g.diags.push(d);
        Val::Poison
    }

    pub(crate) fn bind(&mut self, name: &str, v: Val) {
        // A value keeps the first name it was given (where it was defined), not the names
        // of the parameters it is later passed as.
        if let Val::Tensor(t) = &v {
            if self.b.func.names[t.0 as usize].is_none() {
                self.b.name(*t, name);
            }
        }
        let scope = self.frame().scopes.last_mut().expect("a scope");
        scope.insert(name.to_string(), v);
    }

    fn lookup_local(&self, name: &str) -> Option<&Val> {
        let frame = self.frames.last().expect("a frame");
        frame.scopes.iter().rev().find_map(|s| s.get(name))
    }

    /// Resolves a name: locals, then model params, config values, and built-in constants.
    fn name(&mut self, name: &str, span: Span) -> Val {
        if let Some(v) = self.lookup_local(name) {
            return v.clone();
        }
        let (in_model, layer) = {
            let f = self.frames.last().expect("a frame");
            (f.in_model, f.layer)
        };
        if in_model {
            if let Some(id) = self.g.top_params.get(name) {
                return Val::Param(*id);
            }
            if let Some(ids) = self.g.layer_params.get(name) {
                return match layer {
                    Some(l) => ids
                        .get((l - self.g.layer_start) as usize)
                        .map(|id| Val::Param(*id))
                        .unwrap_or(Val::Poison),
                    None => self.err(
                        span,
                        format!(
                            "`{name}` is a per-layer param; use it inside `for {} in layers {{ ... }}`",
                            self.g.layer_var.clone().unwrap_or_else(|| "L".into())
                        ),
                    ),
                };
            }
            if name == "layers" && self.g.layer_var.is_some() {
                return Val::Layers;
            }
        }
        if let Some(c) = self.g.config.get(name) {
            return c.to_val();
        }
        match name {
            "pi" => return Val::Float(std::f64::consts::PI),
            "inf" => return Val::Float(f64::INFINITY),
            "nan" => return Val::Float(f64::NAN),
            _ => {}
        }
        if let Some(d) = DType::from_name(name) {
            return Val::DType(d);
        }
        let mut candidates: Vec<String> = Vec::new();
        for frame_scope in &self.frames.last().expect("a frame").scopes {
            candidates.extend(frame_scope.keys().cloned());
        }
        candidates.extend(self.g.config.keys().cloned());
        if in_model {
            candidates.extend(self.g.top_params.keys().cloned());
            candidates.extend(self.g.layer_params.keys().cloned());
        }
        let mut msg = format!("unknown name `{name}`");
        if let Some(best) = closest(name, candidates.iter().map(String::as_str)) {
            msg.push_str(&format!("; did you mean `{best}`?"));
        } else if self.g.fns.contains_key(name) {
            msg = format!("`{name}` is a function; call it with `{name}(...)`");
        }
        self.err(span, msg)
    }

    // -----------------------------------------------------------------------------------
    // Entry functions, blocks and statements
    // -----------------------------------------------------------------------------------

    /// The dtype a type annotation names: a dtype name, or `model_dtype`, the dtype of
    /// params declared without one (a KV cache holds what the weights compute in).
    fn dtype_named_in_type(&self, name: &str) -> Option<DType> {
        match name {
            "model_dtype" => Some(self.g.options.param_dtype),
            _ => DType::from_name(name),
        }
    }

    /// Lowers an entry function's parameters and body; false when it failed.
    fn lower_entry(&mut self, def: &'p FnDef) -> bool {
        let errors_before = self.g.diags.len();
        for p in &def.params {
            let ty = match &p.ty {
                Some(ast::Type::Tensor { dtype, dims, .. }) => {
                    let dtype = dtype
                        .as_ref()
                        .and_then(|d| self.dtype_named_in_type(&d.name));
                    let Some(dtype) = dtype else {
                        let span = p.ty.as_ref().map(ast::Type::span).unwrap_or(p.span);
                        self.err(span, "unknown dtype");
                        continue;
                    };
                    let mut shape = Vec::new();
                    for d in dims {
                        let ast::DimExpr::Expr(e) = d else { continue };
                        match &e.kind {
                            ExprKind::Name(n)
                                if self.lookup_local(n).is_none()
                                    && !self.g.config.contains_key(n) =>
                            {
                                self.bind(n, Val::Sym(n.clone()));
                                shape.push(Dim::Sym(n.clone()));
                            }
                            _ => match self.expr(e).as_dim() {
                                Some(d) => shape.push(d),
                                None => {
                                    self.err(
                                        e.span,
                                        "a dimension must be a non-negative integer or a name",
                                    );
                                }
                            },
                        }
                    }
                    TensorType::new(dtype, shape)
                }
                Some(ast::Type::Named(id)) => match scalar_input_dtype(&id.name) {
                    Some(d) => TensorType::scalar(d),
                    None => {
                        self.err(id.span, format!("unknown type `{}`", id.name));
                        continue;
                    }
                },
                _ => continue,
            };
            let v = self.b.func.add_param(ty, Some(&p.name.name));
            self.bind(&p.name.name, Val::Tensor(v));
        }
        let result = self.block(&def.body);
        let result_span = def.body.value.as_ref().map_or(def.body.span, |e| e.span);
        let result = match &def.ret {
            Some(ret) => self.check_type(result, ret, "the result", result_span),
            None => result,
        };
        let mut yields = Vec::new();
        self.flatten_results(result, def.body.span, &mut yields);
        self.b.func.body.yields = yields;
        self.g.diags.len() == errors_before
    }

    fn flatten_results(&mut self, v: Val, span: Span, out: &mut Vec<Value>) {
        match v {
            Val::Tuple(items) => {
                for item in items {
                    self.flatten_results(item, span, out);
                }
            }
            Val::Poison => {}
            other => {
                if let Some(t) = self.as_tensor(&other, None, span) {
                    out.push(t);
                }
            }
        }
    }

    pub(crate) fn block(&mut self, block: &'p Block) -> Val {
        self.frame().scopes.push(IndexMap::new());
        for stmt in &block.stmts {
            self.stmt(stmt);
        }
        let value = match &block.value {
            Some(e) => self.expr(e),
            None => Val::Tuple(Vec::new()),
        };
        self.frame().scopes.pop();
        value
    }

    fn stmt(&mut self, stmt: &'p Stmt) {
        match stmt {
            Stmt::Let { pat, value, .. } => {
                let v = self.expr(value);
                self.bind_pat(pat, v);
            }
            Stmt::Assign { name, value, .. } => {
                let v = self.expr(value);
                let frame = self.frames.last_mut().expect("a frame");
                let slot = frame
                    .scopes
                    .iter_mut()
                    .rev()
                    .find_map(|s| s.get_mut(&name.name));
                match slot {
                    Some(slot) => {
                        *slot = v.clone();
                        if let Val::Tensor(t) = v {
                            if self.b.func.names[t.0 as usize].is_none() {
                                self.b.name(t, &name.name);
                            }
                        }
                    }
                    None => {
                        self.err(
                            name.span,
                            format!(
                                "cannot assign to `{0}`: it is not a local variable (introduce it with `let {0} = ...`)",
                                name.name
                            ),
                        );
                    }
                }
            }
            Stmt::For {
                var, iter, body, ..
            } => {
                let it = self.expr(iter);
                let (items, layers): (Vec<Val>, bool) = match it {
                    Val::Range(a, b) => ((a..b).map(Val::Int).collect(), false),
                    Val::Layers => (
                        (self.g.layer_start..self.g.layer_end)
                            .map(Val::Int)
                            .collect(),
                        true,
                    ),
                    Val::List(v) | Val::Tuple(v) => (v, false),
                    Val::Poison => return,
                    other => {
                        self.err(
                            iter.span,
                            format!(
                                "`for` iterates over `layers`, a range `a..b` or a list, found {}",
                                other.describe()
                            ),
                        );
                        return;
                    }
                };
                let saved_layer = self.frame().layer;
                for item in items {
                    if layers {
                        if let Val::Int(l) = item {
                            self.frame().layer = Some(l);
                        }
                    }
                    self.frame().scopes.push(IndexMap::new());
                    self.bind(&var.name, item);
                    let errors = self.g.diags.len();
                    self.block(body);
                    self.frame().scopes.pop();
                    if self.g.diags.len() > errors {
                        // The same error would repeat for every iteration.
                        break;
                    }
                }
                self.frame().layer = saved_layer;
            }
            Stmt::Expr(e) => {
                self.expr(e);
            }
            Stmt::Error(_) => {}
        }
    }

    fn bind_pat(&mut self, pat: &Pat, v: Val) {
        match pat {
            Pat::Name(id) => self.bind(&id.name, v),
            Pat::Wildcard(_) => {}
            Pat::Tuple { elems, span: pspan } => match v {
                Val::Tuple(items) | Val::List(items) if items.len() == elems.len() => {
                    for (p, item) in elems.iter().zip(items) {
                        self.bind_pat(p, item);
                    }
                }
                Val::Poison => {
                    for p in elems {
                        self.bind_pat(p, Val::Poison);
                    }
                }
                other => {
                    self.err(
                        *pspan,
                        format!(
                            "this pattern takes a tuple of {}, found {}",
                            elems.len(),
                            other.describe()
                        ),
                    );
                    for p in elems {
                        self.bind_pat(p, Val::Poison);
                    }
                }
            },
        }
    }

    // -----------------------------------------------------------------------------------
    // Expressions
    // -----------------------------------------------------------------------------------

    pub(crate) fn expr(&mut self, e: &'p Expr) -> Val {
        match &e.kind {
            ExprKind::Int(i) => Val::Int(*i),
            ExprKind::Float(f) => Val::Float(*f),
            ExprKind::Bool(b) => Val::Bool(*b),
            ExprKind::Str(s) => Val::Str(s.clone()),
            ExprKind::Name(n) => self.name(n, e.span),
            ExprKind::Tuple(items) => Val::Tuple(items.iter().map(|i| self.expr(i)).collect()),
            ExprKind::List(items) => Val::List(items.iter().map(|i| self.expr(i)).collect()),
            ExprKind::Unary { op, operand } => {
                let v = self.expr(operand);
                self.unary(*op, v, e.span)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.expr(lhs);
                // `&&` and `||` short-circuit at compile time.
                match (op, &a) {
                    (ast::BinOp::And, Val::Bool(false)) => return Val::Bool(false),
                    (ast::BinOp::Or, Val::Bool(true)) => return Val::Bool(true),
                    _ => {}
                }
                let b = self.expr(rhs);
                self.binary(*op, a, b, e.span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, e.span),
            ExprKind::Field { base, name } => {
                let v = self.expr(base);
                self.field(v, name, e.span)
            }
            ExprKind::TupleIndex { base, index } => match self.expr(base) {
                Val::Tuple(items) | Val::List(items) => match items.get(*index as usize) {
                    Some(v) => v.clone(),
                    None => self.err(
                        e.span,
                        format!("index {index} is out of range for a tuple of {}", items.len()),
                    ),
                },
                Val::Poison => Val::Poison,
                other => self.err(e.span, format!("`.{index}` needs a tuple, found {}", other.describe())),
            },
            ExprKind::Index { base, items } => {
                let v = self.expr(base);
                self.index(v, items, e.span)
            }
            ExprKind::Range { start, end } => match (self.expr(start), self.expr(end)) {
                (Val::Int(a), Val::Int(b)) => Val::Range(a, b),
                (Val::Poison, _) | (_, Val::Poison) => Val::Poison,
                (a, b) => self.err(
                    e.span,
                    format!(
                        "a range needs two integers known at compile time, found {} and {}",
                        a.describe(),
                        b.describe()
                    ),
                ),
            },
            ExprKind::If {
                cond,
                then,
                otherwise,
            } => match self.expr(cond) {
                Val::Bool(true) => self.block(then),
                Val::Bool(false) => self.block(otherwise),
                Val::Poison => Val::Poison,
                other => self.err(
                    cond.span,
                    format!(
                        "`if` needs a condition known at compile time, found {}; use select(cond, a, b) to choose element by element",
                        other.describe()
                    ),
                ),
            },
            ExprKind::Loop { count, vars, body } => self.lower_loop(count, vars, body, e.span),
            ExprKind::Block(block) => self.block(block),
            ExprKind::Error => Val::Poison,
        }
    }

    fn lower_loop(
        &mut self,
        count: &'p Expr,
        vars: &'p [ast::LoopVar],
        body: &'p Block,
        span: Span,
    ) -> Val {
        let count_val = self.expr(count);
        let count_t = match &count_val {
            Val::Int(n) if *n >= 0 => Some(self.full_scalar(*n as f64, DType::I64)),
            Val::Tensor(t) if self.b.ty(*t).dtype.is_int() && self.b.ty(*t).rank() == 0 => {
                Some(self.cast(*t, DType::I64, count.span))
            }
            Val::Poison => None,
            other => {
                self.err(
                    count.span,
                    format!(
                        "a loop count must be a non-negative integer or an integer scalar tensor, found {}",
                        other.describe()
                    ),
                );
                None
            }
        };
        let mut inits = Vec::new();
        for var in vars {
            let v = self.expr(&var.init);
            inits.push(self.as_tensor(&v, None, var.init.span));
        }
        let (Some(count_t), Some(inits)) = (count_t, inits.into_iter().collect::<Option<Vec<_>>>())
        else {
            return Val::Poison;
        };
        let mut arg_types = vec![TensorType::scalar(DType::I64)];
        arg_types.extend(inits.iter().map(|v| self.b.ty(*v).clone()));
        let args = self.b.begin_region(arg_types);
        self.region_depth += 1;
        self.frame().scopes.push(IndexMap::new());
        for (var, arg) in vars.iter().zip(&args[1..]) {
            self.bind(&var.name.name, Val::Tensor(*arg));
        }
        let errors = self.g.diags.len();
        let value = self.block(body);
        self.frame().scopes.pop();
        let nexts: Vec<Val> = match value {
            Val::Tuple(items) if vars.len() != 1 => items,
            v if vars.len() == 1 => vec![v],
            Val::Poison => vec![Val::Poison; vars.len()],
            other => {
                self.err(
                    body.span,
                    format!(
                        "the loop body must yield the next value of its {} carried variables as a tuple, found {}",
                        vars.len(),
                        other.describe()
                    ),
                );
                vec![Val::Poison; vars.len()]
            }
        };
        let mut yields = Vec::new();
        if nexts.len() != vars.len() {
            self.err(
                body.span,
                format!(
                    "the loop body yields {} values but the loop carries {}",
                    nexts.len(),
                    vars.len()
                ),
            );
        } else {
            for ((var, next), arg) in vars.iter().zip(nexts).zip(&args[1..]) {
                let want = self.b.ty(*arg).clone();
                let t = match &next {
                    Val::Poison => None,
                    v => self.as_tensor(v, Some(want.dtype), body.span),
                };
                match t {
                    Some(t) if *self.b.ty(t) == want => yields.push(t),
                    Some(t) => {
                        let got = self.b.ty(t).clone();
                        self.err(
                            var.name.span,
                            format!(
                                "loop variable `{}` starts as {want} but the body yields {got}",
                                var.name.name
                            ),
                        );
                    }
                    None => {}
                }
            }
        }
        let failed = self.g.diags.len() > errors || yields.len() != vars.len();
        if failed {
            // Close the region consistently so the builder stays valid.
            yields = args[1..].to_vec();
        }
        let region = self.b.end_region(yields);
        self.region_depth -= 1;
        let depth = self.region_depth;
        self.param_cache.retain(|(_, d, _)| *d <= depth);
        if failed {
            return Val::Poison;
        }
        let mut operands = vec![count_t];
        operands.extend(inits);
        match self.b.push_with_regions(Op::Loop, &operands, vec![region]) {
            Ok(results) if results.len() == 1 => Val::Tensor(results[0]),
            Ok(results) => Val::Tuple(results.into_iter().map(Val::Tensor).collect()),
            Err(e) => self.err(span, e.message),
        }
    }

    fn field(&mut self, v: Val, name: &ast::Ident, span: Span) -> Val {
        let v = match v {
            Val::Param(id) => match self.materialize(id, span) {
                Some(t) => Val::Tensor(t),
                None => return Val::Poison,
            },
            other => other,
        };
        match (&v, name.name.as_str()) {
            (Val::Poison, _) => Val::Poison,
            (Val::Tensor(t), "T") => {
                let rank = self.b.ty(*t).rank();
                if rank < 2 {
                    return self.err(
                        span,
                        format!(
                            "`.T` needs a tensor of rank 2 or more, found {}",
                            self.b.ty(*t)
                        ),
                    );
                }
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(rank - 2, rank - 1);
                self.push1(Op::Permute { perm }, &[*t], span)
            }
            (Val::Tensor(t), "dtype") => Val::DType(self.b.ty(*t).dtype),
            (Val::Tensor(t), "shape") => Val::List(
                self.b
                    .ty(*t)
                    .shape
                    .0
                    .iter()
                    .cloned()
                    .map(Val::from)
                    .collect(),
            ),
            (Val::Tensor(t), "rank") => Val::Int(self.b.ty(*t).rank() as i64),
            (Val::List(items) | Val::Tuple(items), "len") => Val::Int(items.len() as i64),
            _ => self.err(
                name.span,
                format!("{} has no field `{}`", v.describe(), name.name),
            ),
        }
    }

    fn call(&mut self, callee: &'p Expr, args: &'p [ast::Arg], span: Span) -> Val {
        let mut evaluated = Vec::new();
        let name: &'p ast::Ident = match &callee.kind {
            ExprKind::Name(_) => {
                let ExprKind::Name(n) = &callee.kind else {
                    unreachable!()
                };
                // A synthetic ident covering the callee.
                return self.call_named(n, callee.span, None, args, span);
            }
            ExprKind::Field { base, name } => {
                // `module.function(...)` or a method call `x.f(...)`.
                if let ExprKind::Name(m) = &base.kind {
                    if self.g.modules.contains(m) && self.lookup_local(m).is_none() {
                        return self.call_named(&name.name, name.span, None, args, span);
                    }
                }
                let receiver = self.expr(base);
                evaluated.push(ArgVal {
                    name: None,
                    value: receiver,
                    span: base.span,
                });
                name
            }
            _ => {
                self.expr(callee);
                return self.err(callee.span, "only functions can be called");
            }
        };
        self.call_named(&name.name, name.span, Some(evaluated), args, span)
    }

    fn call_named(
        &mut self,
        name: &str,
        name_span: Span,
        receiver: Option<Vec<ArgVal>>,
        args: &'p [ast::Arg],
        span: Span,
    ) -> Val {
        let mut evaluated = receiver.unwrap_or_default();
        for arg in args {
            let value = self.expr(&arg.value);
            evaluated.push(ArgVal {
                name: arg.name.as_ref().map(|n| n.name.clone()),
                value,
                span: arg.value.span,
            });
        }
        if let Some(info) = self.g.fns.get(name).copied() {
            return self.call_user(info, evaluated, span);
        }
        match self.builtin(name, evaluated, span) {
            Some(v) => v,
            None => {
                let mut candidates: Vec<&str> = self.g.fns.keys().map(String::as_str).collect();
                candidates.extend(crate::builtins::BUILTIN_NAMES);
                let mut msg = format!("unknown function `{name}`");
                if let Some(best) = closest(name, candidates.into_iter()) {
                    msg.push_str(&format!("; did you mean `{best}`?"));
                }
                self.err(name_span, msg)
            }
        }
    }

    /// Inlines a call to a user function.
    fn call_user(&mut self, info: FnInfo<'p>, args: Vec<ArgVal>, span: Span) -> Val {
        let def = info.def;
        if self
            .frames
            .iter()
            .any(|f| f.def.is_some_and(|d| std::ptr::eq(d, def)))
        {
            return self.err(
                span,
                format!(
                    "`{}` calls itself; kiln functions are inlined and cannot recurse",
                    def.name.name
                ),
            );
        }
        if self.frames.len() >= MAX_CALL_DEPTH {
            return self.err(span, "calls nest too deeply");
        }
        // Match arguments to parameters.
        let mut slots: Vec<Option<ArgVal>> = def.params.iter().map(|_| None).collect();
        let mut positional = 0;
        for arg in args {
            let index = match &arg.name {
                Some(n) => match def.params.iter().position(|p| &p.name.name == n) {
                    Some(i) => i,
                    None => {
                        self.err(
                            arg.span,
                            format!("`{}` has no parameter named `{n}`", def.name.name),
                        );
                        continue;
                    }
                },
                None => {
                    let i = positional;
                    positional += 1;
                    if i >= def.params.len() {
                        self.err(
                            arg.span,
                            format!(
                                "`{}` takes {} argument{}, but more were given",
                                def.name.name,
                                def.params.len(),
                                if def.params.len() == 1 { "" } else { "s" }
                            ),
                        );
                        continue;
                    }
                    i
                }
            };
            if slots[index].is_some() {
                self.err(
                    arg.span,
                    format!("`{}` is given twice", def.params[index].name.name),
                );
            }
            slots[index] = Some(arg);
        }
        let caller_file = self.frames.last().expect("a frame").file;
        let layer = self.frames.last().expect("a frame").layer;
        self.frames.push(Frame {
            file: info.file,
            scopes: vec![IndexMap::new()],
            in_model: info.in_model,
            layer,
            call_site: Some((caller_file, span, def.name.name.clone())),
            def: Some(def),
        });
        for (param, slot) in def.params.iter().zip(slots) {
            let (value, arg_span) = match slot {
                Some(a) => (a.value, a.span),
                None => match &param.default {
                    Some(d) => (self.expr(d), d.span),
                    None => {
                        self.frames.pop();
                        let v = self.err(
                            span,
                            format!(
                                "missing argument `{}` of `{}`",
                                param.name.name, def.name.name
                            ),
                        );
                        return v;
                    }
                },
            };
            let value = match &param.ty {
                Some(ty) => {
                    let what = format!("argument `{}`", param.name.name);
                    self.check_type_at(value, ty, &what, arg_span, caller_file)
                }
                None => value,
            };
            self.bind(&param.name.name, value);
        }
        let result = self.block(&def.body);
        let result_span = def.body.value.as_ref().map_or(def.body.span, |e| e.span);
        let result = match &def.ret {
            Some(ret) => self.check_type(result, ret, "the result", result_span),
            None => result,
        };
        self.frames.pop();
        result
    }

    /// Checks `v` against a declared type, binding the dimension names it introduces.
    pub(crate) fn check_type(&mut self, v: Val, ty: &'p ast::Type, what: &str, span: Span) -> Val {
        let file = self.frames.last().expect("a frame").file;
        self.check_type_at(v, ty, what, span, file)
    }

    /// Like `check_type`; `span` lies in `span_file` (an argument's span is in the caller).
    fn check_type_at(
        &mut self,
        v: Val,
        ty: &'p ast::Type,
        what: &str,
        span: Span,
        span_file: FileId,
    ) -> Val {
        let mismatch = |cx: &mut Self, msg: String| -> Val {
            let mut d = Diagnostic::error(msg).with_label(span_file, span, "");
            let file = cx.frames.last().expect("a frame").file;
            d = d.with_label(file, ty.span(), "declared here");
            cx.g.diags.push(d);
            Val::Poison
        };
        match (ty, v) {
            (_, Val::Poison) => Val::Poison,
            (ast::Type::Tuple { elems, .. }, Val::Tuple(items)) if elems.len() == items.len() => {
                Val::Tuple(
                    elems
                        .iter()
                        .zip(items)
                        .map(|(t, item)| self.check_type_at(item, t, what, span, span_file))
                        .collect(),
                )
            }
            (ast::Type::Tuple { elems, .. }, other) => mismatch(
                self,
                format!(
                    "{what} should be a tuple of {}, found {}",
                    elems.len(),
                    other.describe()
                ),
            ),
            (ast::Type::Named(id), v) => {
                let name = id.name.as_str();
                let ok = match (&v, name) {
                    (Val::Int(_), "int" | "float") => true,
                    (Val::Float(_), "float") => true,
                    (Val::Int(_) | Val::Float(_), n)
                        if DType::from_name(n).is_some_and(DType::is_float) =>
                    {
                        true
                    }
                    (Val::Int(_), n) if DType::from_name(n).is_some_and(DType::is_int) => true,
                    (Val::Bool(_), "bool") => true,
                    (Val::Str(_), "str") => true,
                    (Val::Tensor(t), n) => {
                        let ty = self.b.ty(*t);
                        ty.rank() == 0 && scalar_input_dtype(n) == Some(ty.dtype)
                    }
                    _ => false,
                };
                if ok {
                    v
                } else if scalar_input_dtype(name).is_none() && !matches!(name, "bool" | "str") {
                    mismatch(self, format!("unknown type `{name}`"))
                } else {
                    let found = self.describe_val(&v);
                    mismatch(self, format!("{what} should be {name}, found {found}"))
                }
            }
            (ast::Type::Tensor { dtype, dims, .. }, v) => {
                let t = match &v {
                    Val::Int(_) | Val::Float(_) | Val::Bool(_)
                        if dims.iter().all(|d| matches!(d, ast::DimExpr::Ellipsis(_))) =>
                    {
                        let want = dtype
                            .as_ref()
                            .and_then(|d| self.dtype_named_in_type(&d.name));
                        self.as_tensor(&v, want, span)
                    }
                    Val::Tensor(t) => Some(*t),
                    Val::Param(id) => self.materialize(*id, span),
                    other => {
                        let found = other.describe();
                        return mismatch(self, format!("{what} should be a tensor, found {found}"));
                    }
                };
                let Some(t) = t else { return Val::Poison };
                let actual = self.b.ty(t).clone();
                if let Some(d) = dtype {
                    match self.dtype_named_in_type(&d.name) {
                        Some(want) if want == actual.dtype => {}
                        Some(want) => {
                            return mismatch(
                                self,
                                format!("{what} should have dtype {want}, found {actual}"),
                            )
                        }
                        None => return mismatch(self, format!("unknown dtype `{}`", d.name)),
                    }
                }
                if !self.match_dims(dims, &actual.shape) {
                    let expected = render_dims(
                        dims,
                        self.g.program,
                        self.frames.last().expect("a frame").file,
                    );
                    return mismatch(
                        self,
                        format!("{what} should have shape [{expected}], found {actual}"),
                    );
                }
                Val::Tensor(t)
            }
        }
    }

    /// Matches declared dims against a shape, binding new dim names; false on mismatch.
    fn match_dims(&mut self, dims: &'p [ast::DimExpr], shape: &Shape) -> bool {
        let ellipsis = dims
            .iter()
            .position(|d| matches!(d, ast::DimExpr::Ellipsis(_)));
        let fixed = dims.len() - usize::from(ellipsis.is_some());
        let rank = shape.rank();
        if ellipsis.is_some() && rank < fixed || ellipsis.is_none() && rank != fixed {
            return false;
        }
        let mut pairs: Vec<(&'p Expr, &Dim)> = Vec::new();
        let (before, after) = match ellipsis {
            Some(i) => (&dims[..i], &dims[i + 1..]),
            None => (dims, &dims[dims.len()..]),
        };
        for (d, actual) in before.iter().zip(&shape.0) {
            if let ast::DimExpr::Expr(e) = d {
                pairs.push((e, actual));
            }
        }
        for (d, actual) in after.iter().zip(&shape.0[rank - after.len()..]) {
            if let ast::DimExpr::Expr(e) = d {
                pairs.push((e, actual));
            }
        }
        for (e, actual) in pairs {
            if let ExprKind::Name(n) = &e.kind {
                if self.lookup_local(n).is_none() && !self.g.config.contains_key(n) {
                    self.bind(n, Val::from(actual.clone()));
                    continue;
                }
            }
            match self.expr(e).as_dim() {
                Some(want) if &want == actual => {}
                _ => return false,
            }
        }
        true
    }

    fn describe_val(&self, v: &Val) -> String {
        match v {
            Val::Tensor(t) => format!("a tensor {}", self.b.ty(*t)),
            other => other.describe(),
        }
    }

    /// The declared type of a param: its dims evaluated now (they must be constants).
    fn param_type(&mut self, decl: &'p ast::ParamDecl) -> Option<TensorType> {
        let ast::Type::Tensor { dtype, dims, span } = &decl.ty else {
            self.err(
                decl.ty.span(),
                "a param's type must be a tensor type such as `[vocab_size, hidden_size]`",
            );
            return None;
        };
        let dtype = match dtype {
            Some(d) => match DType::from_name(&d.name) {
                Some(d) => d,
                None => {
                    self.err(d.span, format!("unknown dtype `{}`", d.name));
                    return None;
                }
            },
            None => self.g.options.param_dtype,
        };
        let mut shape = Vec::new();
        for d in dims {
            match d {
                ast::DimExpr::Ellipsis(s) => {
                    self.err(
                        *s,
                        "a param's shape must be fully known; `...` is not allowed here",
                    );
                    return None;
                }
                ast::DimExpr::Expr(e) => match self.expr(e) {
                    Val::Int(n) if n >= 0 => shape.push(Dim::Const(n as u64)),
                    Val::Poison => return None,
                    other => {
                        self.err(
                            e.span,
                            format!("a param dimension must be a non-negative integer known at compile time, found {}", other.describe()),
                        );
                        return None;
                    }
                },
            }
        }
        let _ = span;
        Some(TensorType::new(dtype, shape))
    }

    /// Emits (once per region scope) the IR `param` op for a model param, following ties.
    pub(crate) fn materialize(&mut self, id: ParamId, span: Span) -> Option<Value> {
        let mut root = id;
        let mut hops = 0;
        while let Some(ParamSource::Tied(next)) = &self.g.params[root.0 as usize].source {
            root = *next;
            hops += 1;
            if hops > self.g.params.len() {
                self.err(span, "params are tied to each other in a cycle");
                return None;
            }
        }
        if let Some((_, _, v)) = self.param_cache.iter().find(|(p, _, _)| *p == id) {
            return Some(*v);
        }
        let declared = self.g.params[id.0 as usize].ty.clone()?;
        let root_info = &self.g.params[root.0 as usize];
        let root_ty = root_info.ty.clone()?;
        let Some(ParamSource::Checkpoint(name)) = root_info.source.clone() else {
            return None;
        };
        if declared != root_ty {
            let decl_name = self.g.params[id.0 as usize].decl.name.name.clone();
            let root_name = root_info.decl.name.name.clone();
            self.err(
                span,
                format!("param `{decl_name}` is declared as {declared} but is tied to `{root_name}`, which is {root_ty}"),
            );
            return None;
        }
        let v = match self.b.push1(
            Op::Param {
                name: name.clone(),
                ty: declared.clone(),
            },
            &[],
        ) {
            Ok(v) => v,
            Err(e) => {
                self.err(span, e.message);
                return None;
            }
        };
        let info = &self.g.params[id.0 as usize];
        let mut declared_as = info.decl.name.name.clone();
        if let Some(l) = info.layer {
            declared_as = format!("{declared_as}[{l}]");
        }
        self.b.name(v, &info.decl.name.name.clone());
        let binding = self
            .g
            .bindings
            .entry(name.clone())
            .or_insert_with(|| ParamBinding {
                checkpoint_name: name,
                ty: declared,
                declared_as: Vec::new(),
            });
        if !binding.declared_as.contains(&declared_as) {
            binding.declared_as.push(declared_as);
        }
        self.param_cache.push((id, self.region_depth, v));
        Some(v)
    }

    // -----------------------------------------------------------------------------------
    // Tensor helpers shared with the built-in functions
    // -----------------------------------------------------------------------------------

    /// Pushes a single-result op; an IR type error becomes a diagnostic at `span`.
    pub(crate) fn push1(&mut self, op: Op, operands: &[Value], span: Span) -> Val {
        match self.b.push1(op, operands) {
            Ok(v) => Val::Tensor(v),
            Err(e) => self.err(span, e.message),
        }
    }

    pub(crate) fn full_scalar(&mut self, value: f64, dtype: DType) -> Value {
        self.b
            .push1(
                Op::Full {
                    value,
                    dtype,
                    shape: Shape::scalar(),
                },
                &[],
            )
            .expect("a scalar constant is always well typed")
    }

    pub(crate) fn cast(&mut self, v: Value, to: DType, span: Span) -> Value {
        if self.b.ty(v).dtype == to {
            return v;
        }
        match self.b.push1(Op::Cast { to }, &[v]) {
            Ok(c) => c,
            Err(e) => {
                self.err(span, e.message);
                v
            }
        }
    }

    /// The value as an IR tensor: compile-time numbers become scalars of `hint` (or their
    /// natural dtype: i64 for integers, f32 for floats), params are materialized.
    pub(crate) fn as_tensor(&mut self, v: &Val, hint: Option<DType>, span: Span) -> Option<Value> {
        match v {
            Val::Tensor(t) => Some(*t),
            Val::Param(id) => self.materialize(*id, span),
            Val::Int(i) => {
                let d = hint.filter(|d| *d != DType::Bool).unwrap_or(DType::I64);
                Some(self.full_scalar(*i as f64, d))
            }
            Val::Float(f) => {
                let d = hint.filter(|d| d.is_float()).unwrap_or(DType::F32);
                Some(self.full_scalar(*f, d))
            }
            Val::Bool(b) => {
                let d = hint.unwrap_or(DType::Bool);
                Some(self.full_scalar(f64::from(u8::from(*b)), d))
            }
            Val::Poison => None,
            other => {
                self.err(
                    span,
                    format!("expected a tensor or a number, found {}", other.describe()),
                );
                None
            }
        }
    }
}

/// Renders declared dims for an error message, using the source text of each.
fn render_dims(dims: &[ast::DimExpr], program: &Program, file: FileId) -> String {
    let src = program.sources.source(file);
    dims.iter()
        .map(|d| match d {
            ast::DimExpr::Ellipsis(_) => "...".to_string(),
            ast::DimExpr::Expr(e) => src.get(e.span.range()).unwrap_or("?").to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The candidate closest to `name` by edit distance, when it is close enough to suggest.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (name.len() / 3).max(1);
    candidates
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
