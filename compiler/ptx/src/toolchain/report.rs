//! Parses the log of `ptxas -v` into per-function resource reports and notices.
//!
//! ptxas 13.5 writes its `-v` log to stderr, one message a line:
//!
//! ```text
//! ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; ...
//! ptxas info    : 0 bytes gmem
//! ptxas info    : Compiling entry function 'with_shared' for 'sm_90a'
//! ptxas info    : Function properties for with_shared
//!     64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 10 registers, used 1 barriers, 64 bytes cumulative stack size, 4096 bytes smem
//! ptxas info    : Compile time = 16.320 ms
//! ptxas warning : Registers are spilled to local memory in function 'spiller', ...
//! ptxas kernel.ptx, line 11; error   : Unknown symbol '%r9'
//! ```
//!
//! Resource lines (`Used ...`, the indented properties line) belong to the function
//! named by the latest `Compiling ... function` or `Function properties for` line.
//! Every other message (warnings, coded performance notices such as C7508/C7515,
//! errors) becomes a [`PtxasNotice`], attached to a function when it names one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Whether a function is a kernel (`.entry`) or a device function (`.func`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FunctionKind {
    Entry,
    Function,
}

/// How serious a ptxas message is (`fatal` counts as an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NoticeSeverity {
    Info,
    Warning,
    Error,
}

/// One ptxas message that is not a plain resource statistic: a warning, a performance
/// notice (`(C7515) ...`), an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxasNotice {
    pub severity: NoticeSeverity,
    /// The message code, such as `"C7508"`, when ptxas gave one.
    pub code: Option<String>,
    /// The message after the severity and the code.
    pub message: String,
    /// The PTX line the message points at (`ptxas FILE, line N; error : ...`).
    pub ptx_line: Option<u32>,
    /// The function the message names, when it names one that the log reports.
    pub function: Option<String>,
    /// The whole line as ptxas printed it.
    pub line: String,
}

/// What ptxas reported for one compiled function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxasReport {
    pub name: String,
    pub kind: FunctionKind,
    /// The architecture ptxas compiled the function for (`"sm_90a"`), when it said.
    pub arch: Option<String>,
    pub registers: u32,
    pub barriers: u32,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
    /// Static shared memory (`N bytes smem`).
    pub shared_memory_bytes: u64,
    pub stack_frame_bytes: u64,
    /// Stack of the function and everything it calls (`N bytes cumulative stack size`).
    pub cumulative_stack_bytes: u64,
    /// Constant memory by bank (`380 bytes cmem[0]`).
    pub constant_bank_bytes: BTreeMap<u32, u64>,
    /// The notices that name this function.
    pub notices: Vec<PtxasNotice>,
}

impl PtxasReport {
    fn new(name: &str, kind: FunctionKind) -> Self {
        PtxasReport {
            name: name.to_string(),
            kind,
            arch: None,
            registers: 0,
            barriers: 0,
            spill_store_bytes: 0,
            spill_load_bytes: 0,
            shared_memory_bytes: 0,
            stack_frame_bytes: 0,
            cumulative_stack_bytes: 0,
            constant_bank_bytes: BTreeMap::new(),
            notices: Vec::new(),
        }
    }

    /// Whether ptxas spilled registers to local memory.
    pub fn has_spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Everything parsed from one `ptxas -v` log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtxasLog {
    /// The functions in the order ptxas reported them.
    pub functions: Vec<PtxasReport>,
    /// Every notice, in log order (each is also copied to the function it names).
    pub notices: Vec<PtxasNotice>,
    /// Global memory the module declares (`N bytes gmem`).
    pub global_memory_bytes: u64,
}

impl PtxasLog {
    /// Parses a `ptxas -v` log. Lines it does not recognise become notices; nothing
    /// fails.
    pub fn parse(log: &str) -> PtxasLog {
        let mut parser = LogParser::default();
        for line in log.lines() {
            parser.line(line);
        }
        parser.finish()
    }

    /// The report for the function called `name`.
    pub fn function(&self, name: &str) -> Option<&PtxasReport> {
        self.functions.iter().find(|report| report.name == name)
    }

    /// The kernels (`.entry` functions).
    pub fn entries(&self) -> impl Iterator<Item = &PtxasReport> {
        self.functions
            .iter()
            .filter(|report| report.kind == FunctionKind::Entry)
    }

    /// The notices of the given severity or worse.
    pub fn notices_at_least(&self, severity: NoticeSeverity) -> impl Iterator<Item = &PtxasNotice> {
        self.notices
            .iter()
            .filter(move |notice| notice.severity >= severity)
    }

    /// The first PTX line number an error points at.
    pub fn first_error_line(&self) -> Option<u32> {
        self.notices
            .iter()
            .filter(|notice| notice.severity == NoticeSeverity::Error)
            .find_map(|notice| notice.ptx_line)
    }
}

#[derive(Default)]
struct LogParser {
    log: PtxasLog,
    current: Option<usize>,
}

impl LogParser {
    fn line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        match line.strip_prefix("ptxas") {
            Some(rest) => self.message(line, rest),
            // continuation lines (the indented properties line) have no prefix
            None => self.statistics(line),
        }
    }

    fn message(&mut self, line: &str, rest: &str) {
        let Some((head, body)) = rest.split_once(':') else {
            self.notice(line, NoticeSeverity::Info, None, rest.trim());
            return;
        };
        // head is "info    ", "warning ", "fatal   " or " FILE, line N; error   "
        let (location, severity_word) = match head.rsplit_once(';') {
            Some((location, severity)) => (Some(location), severity.trim()),
            None => (None, head.trim()),
        };
        let ptx_line = location.and_then(line_number);
        let severity = match severity_word {
            "warning" => NoticeSeverity::Warning,
            "error" | "fatal" => NoticeSeverity::Error,
            _ => NoticeSeverity::Info,
        };
        let body = body.trim();
        if severity == NoticeSeverity::Info && self.info(body) {
            return;
        }
        self.notice(line, severity, ptx_line, body);
    }

    /// Handles the resource-statistics info lines; false for any other info message.
    fn info(&mut self, body: &str) -> bool {
        if let Some(rest) = body.strip_prefix("Compiling entry function ") {
            self.begin_compiling(rest, FunctionKind::Entry);
        } else if let Some(rest) = body.strip_prefix("Compiling function ") {
            self.begin_compiling(rest, FunctionKind::Function);
        } else if let Some(name) = body.strip_prefix("Function properties for ") {
            let name = unquote(name.trim());
            let index = self.function_index(name, FunctionKind::Function);
            self.current = Some(index);
        } else if body.starts_with("Used ") {
            self.statistics(body);
        } else if body.starts_with("Compile time = ") {
            // timing is not a property of the code
        } else if let Some(bytes) = body
            .strip_suffix(" bytes gmem")
            .and_then(|n| n.trim().parse().ok())
        {
            self.log.global_memory_bytes = bytes;
        } else {
            return false;
        }
        true
    }

    fn begin_compiling(&mut self, rest: &str, kind: FunctionKind) {
        // "'name' for 'sm_80'"
        let (name, arch) = match rest.rsplit_once(" for ") {
            Some((name, arch)) => (unquote(name.trim()), Some(unquote(arch.trim()))),
            None => (unquote(rest.trim()), None),
        };
        let index = self.function_index(name, kind);
        let report = &mut self.log.functions[index];
        report.kind = kind;
        if let Some(arch) = arch {
            report.arch = Some(arch.to_string());
        }
        self.current = Some(index);
    }

    fn function_index(&mut self, name: &str, kind: FunctionKind) -> usize {
        if let Some(index) = self.log.functions.iter().position(|f| f.name == name) {
            return index;
        }
        self.log.functions.push(PtxasReport::new(name, kind));
        self.log.functions.len() - 1
    }

    /// "Used 12 registers, used 0 barriers, 380 bytes cmem[0]" or
    /// "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads".
    fn statistics(&mut self, text: &str) {
        let Some(index) = self.current else {
            self.notice(text, NoticeSeverity::Info, None, text.trim());
            return;
        };
        let report = &mut self.log.functions[index];
        for part in text.split(',') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let Some(at) = words.iter().position(|w| w.parse::<u64>().is_ok()) else {
                continue;
            };
            let value: u64 = words[at].parse().unwrap_or(0);
            let count = u32::try_from(value).unwrap_or(u32::MAX);
            match &words[at + 1..] {
                ["registers"] => report.registers = count,
                ["barriers"] => report.barriers = count,
                ["bytes", "smem"] => report.shared_memory_bytes = value,
                ["bytes", "stack", "frame"] => report.stack_frame_bytes = value,
                ["bytes", "spill", "stores"] => report.spill_store_bytes = value,
                ["bytes", "spill", "loads"] => report.spill_load_bytes = value,
                ["bytes", "cumulative", "stack", "size"] => report.cumulative_stack_bytes = value,
                ["bytes", bank] => {
                    if let Some(number) = bank
                        .strip_prefix("cmem[")
                        .and_then(|b| b.strip_suffix(']'))
                        .and_then(|b| b.parse().ok())
                    {
                        report.constant_bank_bytes.insert(number, value);
                    }
                }
                _ => {}
            }
        }
    }

    fn notice(&mut self, line: &str, severity: NoticeSeverity, ptx_line: Option<u32>, body: &str) {
        let (code, message) = split_code(body);
        self.log.notices.push(PtxasNotice {
            severity,
            code,
            message: message.to_string(),
            ptx_line,
            function: None,
            line: line.trim_end().to_string(),
        });
    }

    /// Attributes each notice to the function it names, once all names are known
    /// (a notice can come before the function's own lines).
    fn finish(mut self) -> PtxasLog {
        let names: Vec<String> = self.log.functions.iter().map(|f| f.name.clone()).collect();
        for notice in &mut self.log.notices {
            notice.function = named_function(&notice.message, &names);
            if let Some(name) = &notice.function {
                if let Some(report) = self.log.functions.iter_mut().find(|f| &f.name == name) {
                    report.notices.push(notice.clone());
                }
            }
        }
        self.log
    }
}

/// "kernel.ptx, line 11" -> 11
fn line_number(location: &str) -> Option<u32> {
    let (_, after) = location.rsplit_once("line ")?;
    after.trim().parse().ok()
}

/// "(C7508) Potential ..." -> (Some("C7508"), "Potential ...")
fn split_code(body: &str) -> (Option<String>, &str) {
    if let Some(rest) = body.strip_prefix('(') {
        if let Some((code, message)) = rest.split_once(')') {
            let looks_like_code = code.len() > 1
                && code.starts_with(|c: char| c.is_ascii_uppercase())
                && code[1..].bytes().all(|b| b.is_ascii_digit());
            if looks_like_code {
                return (Some(code.to_string()), message.trim());
            }
        }
    }
    (None, body)
}

fn unquote(text: &str) -> &str {
    text.strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .unwrap_or(text)
}

/// The function a message names: `'name'` in quotes, or `entry name` / `function name`.
fn named_function(message: &str, names: &[String]) -> Option<String> {
    if let Some(name) = names
        .iter()
        .find(|name| message.contains(&format!("'{name}'")))
    {
        return Some(name.clone());
    }
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.');
    let words: Vec<&str> = message
        .split(|c: char| !is_name_char(c))
        .filter(|w| !w.is_empty())
        .collect();
    words.windows(2).find_map(|pair| {
        let introduces_name = matches!(pair[0], "entry" | "function");
        let name = pair[1].trim_end_matches('.');
        (introduces_name && names.iter().any(|n| n == name)).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Logs below were printed by ptxas 13.5 (V13.5.37) for small hand-written kernels.

    const VECTOR_ADD_SM80: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'vector_add' for 'sm_80'
ptxas info    : Function properties for vector_add
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compile time = 3.189 ms
";

    const TWO_KERNELS_AND_A_HELPER_SM90A: &str = "\
ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at entry.
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'maxnreg_warn' for 'sm_90a'
ptxas info    : Function properties for maxnreg_warn
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers, used 0 barriers
ptxas info    : Compile time = 6.435 ms
ptxas info    : Compiling entry function 'with_shared' for 'sm_90a'
ptxas info    : Function properties for with_shared
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 64 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 16.320 ms
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
";

    const SPILLS_WITH_WARNING: &str = "\
ptxas info    : Overriding maximum register limit 256 for 'spiller' with  24 of maxrregcount option
ptxas warning : Registers are spilled to local memory in function 'spiller', 416 bytes spill stores, 592 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spiller' for 'sm_80'
ptxas info    : Function properties for spiller
    400 bytes stack frame, 416 bytes spill stores, 592 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 400 bytes cumulative stack size, 368 bytes cmem[0]
ptxas info    : Compile time = 13.568 ms
";

    const WGMMA_AND_ENTRY_WARNING: &str = "\
ptxas info    : (C7517) wgmma.wait_group is injected in around line 19 by compiler to allow use of registers defined by GMMA in function 'wg'
ptxas warning : Value of threads per SM for entry k is out of range. .minnctapersm will be ignored
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'wg' for 'sm_90a'
ptxas info    : Function properties for wg
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers, used 0 barriers
";

    const ERRORS: &str = "\
ptxas kernel.ptx, line 11; error   : Arguments mismatch for instruction 'add'
ptxas kernel.ptx, line 12; error   : Not a name of any known instruction: 'frobnicate'
ptxas kernel.ptx, line 11; error   : Unknown symbol '%r9'
ptxas fatal   : Ptx assembly aborted due to errors
";

    #[test]
    fn parses_a_single_kernel() {
        let log = PtxasLog::parse(VECTOR_ADD_SM80);
        assert!(log.notices.is_empty(), "{:?}", log.notices);
        assert_eq!(log.functions.len(), 1);
        let report = log.function("vector_add").unwrap();
        assert_eq!(report.kind, FunctionKind::Entry);
        assert_eq!(report.arch.as_deref(), Some("sm_80"));
        assert_eq!(report.registers, 12);
        assert_eq!(report.barriers, 0);
        assert!(!report.has_spills());
        assert_eq!(report.stack_frame_bytes, 0);
        assert_eq!(report.shared_memory_bytes, 0);
        assert_eq!(report.constant_bank_bytes, BTreeMap::from([(0, 380)]));
    }

    #[test]
    fn parses_several_functions_and_attributes_notices() {
        let log = PtxasLog::parse(TWO_KERNELS_AND_A_HELPER_SM90A);
        let names: Vec<_> = log
            .functions
            .iter()
            .map(|f| (f.name.as_str(), f.kind))
            .collect();
        assert_eq!(
            names,
            [
                ("maxnreg_warn", FunctionKind::Entry),
                ("with_shared", FunctionKind::Entry),
                ("helper", FunctionKind::Function),
            ]
        );
        assert_eq!(log.entries().count(), 2);
        let shared = log.function("with_shared").unwrap();
        assert_eq!(shared.registers, 10);
        assert_eq!(shared.barriers, 1);
        assert_eq!(shared.shared_memory_bytes, 4096);
        assert_eq!(shared.stack_frame_bytes, 64);
        assert_eq!(shared.cumulative_stack_bytes, 64);
        assert_eq!(log.function("helper").unwrap().registers, 0);

        assert_eq!(log.notices.len(), 1);
        let notice = &log.notices[0];
        assert_eq!(notice.severity, NoticeSeverity::Info);
        assert_eq!(notice.code.as_deref(), Some("C7508"));
        assert!(notice
            .message
            .starts_with("Potential Performance Loss: 'setmaxnreg' ignored"));
        // the message names no function ('setmaxnreg' is not one)
        assert_eq!(notice.function, None);
        assert!(log.functions.iter().all(|f| f.notices.is_empty()));
    }

    #[test]
    fn parses_spills_and_the_spill_warning() {
        let log = PtxasLog::parse(SPILLS_WITH_WARNING);
        let report = log.function("spiller").unwrap();
        assert_eq!(report.registers, 24);
        assert_eq!(report.spill_store_bytes, 416);
        assert_eq!(report.spill_load_bytes, 592);
        assert_eq!(report.stack_frame_bytes, 400);
        assert!(report.has_spills());
        assert_eq!(report.notices.len(), 2);
        let warnings: Vec<_> = log.notices_at_least(NoticeSeverity::Warning).collect();
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].function.as_deref(), Some("spiller"));
        assert!(warnings[0].message.starts_with("Registers are spilled"));
    }

    #[test]
    fn attributes_quoted_and_unquoted_function_names() {
        let log = PtxasLog::parse(WGMMA_AND_ENTRY_WARNING);
        let codes: Vec<_> = log
            .notices
            .iter()
            .map(|n| (n.code.as_deref(), n.function.as_deref(), n.severity))
            .collect();
        assert_eq!(
            codes,
            [
                (Some("C7517"), Some("wg"), NoticeSeverity::Info),
                (None, Some("k"), NoticeSeverity::Warning),
            ]
        );
        assert_eq!(log.function("wg").unwrap().registers, 30);
        assert_eq!(log.function("wg").unwrap().notices.len(), 1);
        assert_eq!(log.function("k").unwrap().notices.len(), 1);
    }

    #[test]
    fn parses_error_locations() {
        let log = PtxasLog::parse(ERRORS);
        assert!(log.functions.is_empty());
        assert_eq!(log.notices.len(), 4);
        assert!(log
            .notices
            .iter()
            .all(|n| n.severity == NoticeSeverity::Error));
        let lines: Vec<_> = log.notices.iter().map(|n| n.ptx_line).collect();
        assert_eq!(lines, [Some(11), Some(12), Some(11), None]);
        assert_eq!(log.first_error_line(), Some(11));
        assert_eq!(
            log.notices[1].message,
            "Not a name of any known instruction: 'frobnicate'"
        );
    }

    #[test]
    fn unknown_text_never_fails() {
        let log = PtxasLog::parse(
            "garbage\nptxas\nptxas odd line without colon\n    1 bytes stack frame\n",
        );
        assert!(log.functions.is_empty());
        assert_eq!(log.notices.len(), 4);
        assert_eq!(PtxasLog::parse(""), PtxasLog::default());
    }
}
