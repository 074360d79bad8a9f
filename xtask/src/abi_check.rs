//! `cargo xtask abi-check [--toolkit DIR]`: compiles our CANN declarations against an installed toolkit's headers and
//! fails on any mismatch (DESIGN.md section 2, item 3).
//!
//! Our header `candle-ascend/include/cann_subset.h` is run through the C preprocessor (system includes removed, so
//! only our declarations remain, macros expanded and comments gone) and parsed into functions, enums, opaque structs,
//! typedefs and `#define` integer constants. A C++17 translation unit then includes the toolkit's `acl/acl.h`,
//! `aclnn/acl_meta.h` (`aclnn/aclnn_base.h` too where present) and the `aclnnop/aclnn_<op>.h` header of every
//! operator we declare, puts our preprocessed declarations in `namespace ours` (C++ linkage there, so they never clash with the real C functions), and states
//! one `static_assert` per line: the function pointer types are the same once our struct and enum types are mapped to
//! the real ones (`abi::map_t`), enumerators have the same value and enum, enums the same size, typedefs the same
//! type, constants the same value. It is compiled with `$CXX` (default `c++`) `-std=c++17 -fsyntax-only`; each error
//! is attributed by its line to the symbol checked there. A symbol the toolkit does not declare at all is reported as
//! absent (a warning: the loader resolves every symbol optionally; `--strict` makes it an error).
//!
//! An operator's header is `aclnnop/aclnn_<snake_case op>.h` (with the known exceptions in [`HEADER_EXCEPTIONS`]);
//! when that file is missing, every `aclnnop/*.h` is searched for `aclnn<Op>GetWorkspaceSize`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Args)]
pub struct AbiCheckArgs {
    /// Toolkit root holding `include/` (default: $ASCEND_TOOLKIT_HOME).
    #[arg(long, value_name = "DIR")]
    toolkit: Option<PathBuf>,
    /// Extra include folder, searched after the toolkit's (repeatable).
    #[arg(long = "include", value_name = "DIR")]
    includes: Vec<PathBuf>,
    /// Also fail when a symbol we declare is absent from the toolkit's headers.
    #[arg(long)]
    strict: bool,
    /// Write the generated translation unit here (for reading or compiling by hand).
    #[arg(long, value_name = "FILE")]
    keep: Option<PathBuf>,
}

/// Operators whose header name is not `aclnn_<snake_case op>.h` (cann-facts.md 2.5).
const HEADER_EXCEPTIONS: &[(&str, &str)] =
    &[("ArgMax", "aclnn_argmax.h"), ("InplaceScatterUpdate", "aclnn_scatter_update.h")];

/// The runtime and nnopbase headers, always included (cann-facts.md 2.1).
const BASE_HEADERS: &[&str] = &["acl/acl.h", "aclnn/acl_meta.h"];

/// Included too where the toolkit has them (aclnn status codes, `aclnnInit`).
const OPTIONAL_HEADERS: &[&str] = &["aclnn/aclnn_base.h"];

const OUR_HEADER: &str = "candle-ascend/include/cann_subset.h";

/// One declaration of our header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decl {
    Function(String),
    Enum {
        name: String,
        enumerators: Vec<String>,
    },
    /// `typedef struct X X;`: an opaque handle type.
    Opaque(String),
    Typedef(String),
    /// `#define NAME <integer>`, with the value as written.
    Constant {
        name: String,
        value: String,
    },
}

fn decl_name(decl: &Decl) -> &str {
    match decl {
        Decl::Function(n) | Decl::Opaque(n) | Decl::Typedef(n) => n,
        Decl::Enum { name, .. } | Decl::Constant { name, .. } => name,
    }
}

/// What the compiler said about the checks.
#[derive(Debug, Default)]
pub struct Report {
    /// Symbols checked and found equal, as `kind name`.
    pub matched: Vec<String>,
    /// `(kind name, compiler diagnostics)` for every check that failed.
    pub mismatches: Vec<(String, String)>,
    /// Symbols the toolkit's headers do not declare.
    pub absent: Vec<String>,
    /// Operators for which no header was found (their functions are among `absent`).
    pub missing_headers: Vec<String>,
}

pub fn run(args: AbiCheckArgs) -> anyhow::Result<()> {
    let toolkit = match args.toolkit.clone().or_else(|| std::env::var_os("ASCEND_TOOLKIT_HOME").map(PathBuf::from)) {
        Some(t) if !t.as_os_str().is_empty() => t,
        _ => bail!(
            "abi-check needs a CANN toolkit: set ASCEND_TOOLKIT_HOME (e.g. /usr/local/Ascend/ascend-toolkit/latest, \
             done by its set_env.sh) or pass --toolkit DIR. Nothing was checked."
        ),
    };
    let root = crate::bindgen::workspace_root();
    let report = check(&root.join(OUR_HEADER), &toolkit, &args.includes, args.keep.as_deref())?;
    print!("{}", render(&report));
    let failed = !report.mismatches.is_empty() || (args.strict && !report.absent.is_empty());
    if failed {
        bail!(
            "abi-check failed: {} mismatch(es){}",
            report.mismatches.len(),
            if args.strict { format!(", {} absent symbol(s) (--strict)", report.absent.len()) } else { String::new() }
        );
    }
    Ok(())
}

/// Human-readable summary of a report.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "abi-check: {} symbol(s) match the toolkit", report.matched.len());
    if !report.missing_headers.is_empty() {
        let _ = writeln!(out, "no header found for operator(s): {}", report.missing_headers.join(", "));
    }
    if !report.absent.is_empty() {
        let _ = writeln!(
            out,
            "absent from the toolkit's headers ({}; the loader treats them as optional): {}",
            report.absent.len(),
            report.absent.join(", ")
        );
    }
    for (what, diagnostics) in &report.mismatches {
        let _ = writeln!(out, "MISMATCH {what}\n{}", indent(diagnostics));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// The C++ compiler: `$CXX`, else `c++`.
fn cxx() -> String {
    std::env::var("CXX").ok().filter(|c| !c.trim().is_empty()).unwrap_or_else(|| "c++".to_string())
}

fn run_compiler(args: &[&std::ffi::OsStr], stdin: Option<&str>) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    let compiler = cxx();
    let mut child = Command::new(&compiler)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("abi-check needs a C++ compiler: running `{compiler}` failed (set CXX)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Parses our header into declarations (preprocessed by the C compiler, see the module docs).
pub fn parse_header(header: &Path) -> anyhow::Result<(Vec<Decl>, String)> {
    let text = std::fs::read_to_string(header).with_context(|| format!("reading {}", header.display()))?;
    let without_system: String = text
        .lines()
        .map(|l| if l.trim_start().starts_with("#include") && l.contains('<') { "" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = header.parent().unwrap_or(Path::new("."));
    let include = format!("-I{}", dir.display());
    let args = ["-x", "c", "-E", "-P", include.as_str(), "-"];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_ref()).collect();
    let output = run_compiler(&args, Some(&without_system))?;
    if !output.status.success() {
        bail!("preprocessing {} failed:\n{}", header.display(), String::from_utf8_lossy(&output.stderr));
    }
    let preprocessed = String::from_utf8(output.stdout).context("preprocessed header is not UTF-8")?;
    let mut decls = parse_declarations(&preprocessed)?;
    decls.extend(parse_constants(&text));
    Ok((decls, preprocessed))
}

/// `#define NAME <integer>` lines (function-like macros and other values are not constants).
fn parse_constants(text: &str) -> Vec<Decl> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["#define", name, value] if !name.contains('(') && is_integer(value) => {
                    Some(Decl::Constant { name: name.to_string(), value: value.to_string() })
                }
                _ => None,
            }
        })
        .collect()
}

fn is_integer(value: &str) -> bool {
    let v = value.strip_prefix('-').unwrap_or(value);
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()),
        None => !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()),
    }
}

/// Splits preprocessed C declarations at top-level `;` and classifies each; anything unexpected is an error (the
/// check must never silently leave a declaration out).
pub fn parse_declarations(text: &str) -> anyhow::Result<Vec<Decl>> {
    let mut decls = Vec::new();
    let mut depth = 0i32;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ';' && depth == 0 {
            let statement = current.split_whitespace().collect::<Vec<_>>().join(" ");
            if !statement.is_empty() {
                decls.push(classify(&statement)?);
            }
            current.clear();
        } else {
            current.push(c);
        }
    }
    if !current.trim().is_empty() {
        bail!("unterminated declaration at the end of the header: {}", current.trim());
    }
    Ok(decls)
}

fn identifiers(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .collect()
}

fn classify(statement: &str) -> anyhow::Result<Decl> {
    let last_identifier = |text: &str| identifiers(text).last().map(|s| s.to_string());
    if let Some(rest) = statement.strip_prefix("typedef enum") {
        let (open, close) = match (rest.find('{'), rest.rfind('}')) {
            (Some(o), Some(c)) if o < c => (o, c),
            _ => bail!("cannot parse enum: {statement}"),
        };
        let name = last_identifier(&rest[close..]).with_context(|| format!("enum without a name: {statement}"))?;
        let enumerators =
            rest[open + 1..close].split(',').filter_map(|e| identifiers(e).first().map(|s| s.to_string())).collect();
        return Ok(Decl::Enum { name, enumerators });
    }
    if statement.starts_with("typedef") {
        if statement.contains('(') || statement.contains('{') {
            bail!("unsupported typedef (function pointer or struct body) in our header: {statement}");
        }
        let words = identifiers(statement);
        if let ["typedef", "struct", tag, name] = words.as_slice() {
            if tag != name {
                bail!("opaque struct typedef with a different name: {statement}");
            }
            return Ok(Decl::Opaque(name.to_string()));
        }
        return last_identifier(statement).map(Decl::Typedef).with_context(|| format!("typedef: {statement}"));
    }
    if let Some(paren) = statement.find('(') {
        return last_identifier(&statement[..paren])
            .map(Decl::Function)
            .with_context(|| format!("function without a name: {statement}"));
    }
    bail!("unsupported declaration in our header: {statement}")
}

/// snake_case of an operator name: `QuantMatmulV4` -> `quant_matmul_v4`.
fn snake_case(op: &str) -> String {
    let mut out = String::new();
    for (i, c) in op.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The include folders: `<toolkit>/include`, the operator API include folder of the opp package when present, then
/// the extra ones.
fn include_roots(toolkit: &Path, extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut roots = vec![toolkit.join("include")];
    let opp = toolkit.join("opp/built-in/op_impl/ai_core/tbe/op_api/include");
    if opp.is_dir() {
        roots.push(opp);
    }
    roots.extend(extra.iter().cloned());
    roots
}

/// The header (relative to an include root) that declares operator `op`, if any.
fn find_op_header(roots: &[PathBuf], op: &str) -> Option<String> {
    let preferred = HEADER_EXCEPTIONS
        .iter()
        .find(|(name, _)| *name == op)
        .map(|(_, file)| file.to_string())
        .unwrap_or_else(|| format!("aclnn_{}.h", snake_case(op)));
    if roots.iter().any(|r| r.join("aclnnop").join(&preferred).is_file()) {
        return Some(format!("aclnnop/{preferred}"));
    }
    let needle = format!("aclnn{op}GetWorkspaceSize");
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root.join("aclnnop")) else { continue };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "h")) {
            if std::fs::read_to_string(&file).is_ok_and(|text| text.contains(&needle)) {
                return file.file_name().map(|n| format!("aclnnop/{}", n.to_string_lossy()));
            }
        }
    }
    None
}

/// The operators among our functions: `aclnn<Op>GetWorkspaceSize`.
fn operators(decls: &[Decl]) -> Vec<String> {
    decls
        .iter()
        .filter_map(|d| match d {
            Decl::Function(f) => f.strip_prefix("aclnn")?.strip_suffix("GetWorkspaceSize").map(str::to_string),
            _ => None,
        })
        .collect()
}

/// Checks `header` against the toolkit; `keep` saves the generated unit.
pub fn check(header: &Path, toolkit: &Path, extra: &[PathBuf], keep: Option<&Path>) -> anyhow::Result<Report> {
    let roots = include_roots(toolkit, extra);
    for base in BASE_HEADERS {
        if !roots.iter().any(|r| r.join(base).is_file()) {
            bail!(
                "{base} not found under {}: is {} a CANN toolkit?",
                roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
                toolkit.display()
            );
        }
    }
    let (decls, preprocessed) = parse_header(header)?;
    let mut report = Report::default();
    let mut includes: Vec<String> = BASE_HEADERS.iter().map(|s| s.to_string()).collect();
    for optional in OPTIONAL_HEADERS {
        if roots.iter().any(|r| r.join(optional).is_file()) {
            includes.push(optional.to_string());
        }
    }
    for op in operators(&decls) {
        match find_op_header(&roots, &op) {
            Some(h) if !includes.contains(&h) => includes.push(h),
            Some(_) => {}
            None => report.missing_headers.push(op),
        }
    }
    // A type the toolkit lacks breaks the type mapping beyond its own line: such types are left unmapped (and
    // reported absent) and the unit is compiled again.
    let mut unmapped: BTreeSet<String> = BTreeSet::new();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("abi_check.cpp");
    loop {
        let (unit, checks) = translation_unit(&decls, &preprocessed, &includes, &unmapped);
        std::fs::write(&path, &unit)?;
        if let Some(keep) = keep {
            std::fs::write(keep, &unit).with_context(|| format!("writing {}", keep.display()))?;
        }
        let mut args: Vec<std::ffi::OsString> = vec!["-std=c++17".into(), "-fsyntax-only".into()];
        args.extend(roots.iter().map(|r| format!("-I{}", r.display()).into()));
        args.push(path.clone().into());
        let arg_refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let output = run_compiler(&arg_refs, None)?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let mut pass = Report { missing_headers: report.missing_headers.clone(), ..Report::default() };
        let outside = classify_diagnostics(&stderr, &path, &checks, output.status.success(), &mut pass);
        let new_unmapped: Vec<String> = pass
            .absent
            .iter()
            .filter(|a| a.starts_with("struct ") || a.starts_with("enum "))
            .filter(|a| !unmapped.contains(*a))
            .cloned()
            .collect();
        if outside.is_empty() {
            pass.absent.extend(unmapped);
            explain_function_mismatches(&mut pass, &preprocessed, &roots, &includes);
            return Ok(pass);
        }
        if new_unmapped.is_empty() {
            bail!(
                "the generated translation unit does not compile outside the checks (keep it with --keep FILE):\n{}",
                outside.join("\n")
            );
        }
        unmapped.extend(new_unmapped);
    }
}

/// Adds both declarations to each function mismatch: ours (preprocessed) and the toolkit's (the first line naming it
/// in the included headers or in `acl/` and `aclnn/`, up to its `;`), since the compiler names neither type.
fn explain_function_mismatches(report: &mut Report, preprocessed: &str, roots: &[PathBuf], includes: &[String]) {
    let mut files: Vec<PathBuf> = Vec::new();
    for root in roots {
        files.extend(includes.iter().map(|h| root.join(h)).filter(|p| p.is_file()));
        for sub in ["acl", "aclnn"] {
            if let Ok(entries) = std::fs::read_dir(root.join(sub)) {
                let mut found: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                found.sort();
                files.extend(found.into_iter().filter(|p| p.extension().is_some_and(|e| e == "h")));
            }
        }
    }
    for (what, diagnostics) in &mut report.mismatches {
        let Some(function) = what.strip_prefix("function ") else { continue };
        let call = format!("{function}(");
        if let Some(ours) = preprocessed.split(';').find(|d| d.contains(&call)) {
            let ours = ours.split_whitespace().collect::<Vec<_>>().join(" ");
            diagnostics.push_str(&format!("ours: {ours};\n"));
        }
        let named = |l: &str| l.contains(&call) || l.contains(&format!("{function} ("));
        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else { continue };
            let lines: Vec<&str> = text.lines().collect();
            if let Some(start) = lines.iter().position(|l| named(l)) {
                let end = (start..lines.len().min(start + 12)).find(|&i| lines[i].contains(';')).unwrap_or(start);
                let declaration = lines[start..=end].iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
                diagnostics.push_str(&format!("toolkit ({}:{}): {declaration}\n", file.display(), start + 1));
                break;
            }
        }
    }
}

/// Builds the translation unit; returns it and the checks by line number (1-based).
fn translation_unit(
    decls: &[Decl],
    preprocessed: &str,
    includes: &[String],
    unmapped: &BTreeSet<String>,
) -> (String, BTreeMap<usize, String>) {
    let mut lines: Vec<String> = vec![
        "// Generated by `cargo xtask abi-check`: our declarations (namespace ours) against the toolkit's headers."
            .into(),
        "#include <cstddef>".into(),
        "#include <cstdint>".into(),
        "#include <type_traits>".into(),
    ];
    lines.extend(includes.iter().map(|h| format!("#include \"{h}\"")));
    lines.push("namespace ours {".into());
    lines.extend(preprocessed.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    lines.push("}  // namespace ours".into());
    lines.extend(
        [
            "namespace abi {",
            "template <class T> struct map { using type = T; };",
            "template <class T> using map_t = typename map<T>::type;",
            "template <class T> struct map<T *> { using type = map_t<T> *; };",
            "template <class T> struct map<const T> { using type = const map_t<T>; };",
            "template <class R, class... A> struct map<R (*)(A...)> { using type = map_t<R> (*)(map_t<A>...); };",
            "}  // namespace abi",
        ]
        .map(String::from),
    );
    let mut checks = BTreeMap::new();
    let mut add = |lines: &mut Vec<String>, what: String, code: String| {
        lines.push(code);
        checks.insert(lines.len(), what);
    };
    // Type mappings first: the function checks use them.
    for decl in decls {
        if unmapped.contains(&format!("struct {}", decl_name(decl)))
            || unmapped.contains(&format!("enum {}", decl_name(decl)))
        {
            continue;
        }
        match decl {
            Decl::Opaque(n) => add(
                &mut lines,
                format!("struct {n}"),
                format!("namespace abi {{ template <> struct map<ours::{n}> {{ using type = ::{n}; }}; }}"),
            ),
            Decl::Enum { name, .. } => add(
                &mut lines,
                format!("enum {name}"),
                format!(
                    "namespace abi {{ template <> struct map<ours::{name}> {{ using type = ::{name}; }}; }} \
                     static_assert(sizeof(ours::{name}) == sizeof(::{name}), \"enum {name}: size differs\");"
                ),
            ),
            _ => {}
        }
    }
    for decl in decls {
        match decl {
            Decl::Enum { name, enumerators } => {
                for e in enumerators {
                    add(
                        &mut lines,
                        format!("enumerator {name}::{e}"),
                        format!(
                            "static_assert(std::is_same_v<decltype(::{e}), ::{name}> && static_cast<long long>(::{e}) \
                             == static_cast<long long>(ours::{e}), \"enumerator {name}::{e}: value or enum differs\");"
                        ),
                    );
                }
            }
            Decl::Typedef(n) => add(
                &mut lines,
                format!("typedef {n}"),
                format!("static_assert(std::is_same_v<::{n}, abi::map_t<ours::{n}>>, \"typedef {n}: type differs\");"),
            ),
            Decl::Constant { name, value } => add(
                &mut lines,
                format!("constant {name}"),
                format!("static_assert({name} == {value}, \"constant {name}: value differs (ours: {value})\");"),
            ),
            Decl::Function(f) => add(
                &mut lines,
                format!("function {f}"),
                format!(
                    "static_assert(std::is_same_v<decltype(&::{f}), abi::map_t<decltype(&ours::{f})>>, \
                     \"function {f}: signature differs\");"
                ),
            ),
            Decl::Opaque(_) => {}
        }
    }
    let mut unit = lines.join("\n");
    unit.push('\n');
    (unit, checks)
}

/// Attributes the compiler's errors to checks by line; returns the errors found elsewhere.
fn classify_diagnostics(
    stderr: &str,
    unit: &Path,
    checks: &BTreeMap<usize, String>,
    compiled: bool,
    report: &mut Report,
) -> Vec<String> {
    let prefix = format!("{}:", unit.display());
    // (line, message, following notes) of every error in the unit.
    let mut errors: Vec<(usize, String, String)> = Vec::new();
    let mut outside = Vec::new();
    for line in stderr.lines() {
        let located = line.strip_prefix(&prefix).and_then(|rest| {
            let (num, rest) = rest.split_once(':')?;
            Some((num.parse::<usize>().ok()?, rest))
        });
        match located {
            Some((num, rest)) if rest.contains(" error: ") || rest.contains(" fatal error: ") => {
                errors.push((num, rest.trim().to_string(), String::new()))
            }
            _ if line.contains(" error: ") => outside.push(line.to_string()),
            _ => {
                if let Some(last) = errors.last_mut() {
                    last.2.push_str(line);
                    last.2.push('\n');
                }
            }
        }
    }
    let mut failed: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for (num, message, notes) in &errors {
        let Some(what) = checks.get(num) else {
            outside.push(format!("line {num}: {message}"));
            continue;
        };
        let absent = [
            "was not declared",
            "has not been declared",
            "is not a member of",
            "does not name a type",
            "undeclared identifier",
            "no member named",
            "no type named",
        ]
        .iter()
        .any(|p| message.contains(p));
        // A symbol the toolkit does not declare is absent, whatever follow-up errors the compiler adds.
        let entry = failed.entry(what.clone()).or_insert((false, String::new()));
        entry.0 |= absent;
        entry.1.push_str(&format!("{message}\n{notes}"));
    }
    if !compiled && errors.is_empty() && outside.is_empty() {
        outside.push(stderr.to_string());
    }
    for what in checks.values() {
        match failed.remove(what) {
            None => report.matched.push(what.clone()),
            Some((true, _)) => report.absent.push(what.clone()),
            Some((false, diagnostics)) => report.mismatches.push((what.clone(), truncate(&diagnostics, 40))),
        }
    }
    outside
}

fn truncate(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    if all.len() <= lines {
        return text.to_string();
    }
    format!("{}\n... {} more line(s)", all[..lines].join("\n"), all.len() - lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_header() {
        let header = crate::bindgen::workspace_root().join(OUR_HEADER);
        let (decls, preprocessed) = parse_header(&header).unwrap();
        let has = |d: Decl| decls.contains(&d);
        assert!(has(Decl::Function("aclInit".into())));
        // Expanded from the launch macro.
        assert!(
            has(Decl::Function("aclnnRmsNorm".into())) && has(Decl::Function("aclnnRmsNormGetWorkspaceSize".into()))
        );
        assert!(has(Decl::Opaque("aclTensor".into())) && has(Decl::Typedef("aclError".into())));
        assert!(has(Decl::Constant { name: "ACL_ERROR_INVALID_PARAM".into(), value: "100000".into() }));
        let Some(Decl::Enum { enumerators, .. }) = decls.iter().find(|d| decl_name(d) == "aclDataType") else {
            panic!("aclDataType not parsed: {decls:?}");
        };
        assert!(enumerators.iter().any(|e| e == "ACL_BF16") && enumerators.len() == 20, "{enumerators:?}");
        assert!(!preprocessed.contains("#define") && !preprocessed.contains("extern \"C\""));
        let mut names: Vec<&str> = decls.iter().map(decl_name).collect();
        names.sort();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a name is declared twice");
        assert!(operators(&decls).contains(&"QuantMatmulV4".to_string()));
    }

    #[test]
    fn classifies_declarations_and_rejects_the_unknown() {
        let decls = parse_declarations("typedef enum { A = -1, B = 0x10 } E; typedef void *h; int f(int (*cb)(void));")
            .unwrap();
        assert_eq!(
            decls,
            vec![
                Decl::Enum { name: "E".into(), enumerators: vec!["A".into(), "B".into()] },
                Decl::Typedef("h".into()),
                Decl::Function("f".into())
            ]
        );
        assert!(parse_declarations("int x;").is_err());
        assert!(parse_declarations("typedef int (*cb)(int);").is_err());
        assert!(parse_declarations("int f(void)").is_err());
    }

    #[test]
    fn header_names() {
        assert_eq!(snake_case("QuantMatmulV4"), "quant_matmul_v4");
        assert_eq!(snake_case("SwiGlu"), "swi_glu");
        assert!(is_integer("0x0100") && is_integer("-1") && !is_integer("0x") && !is_integer("1u"));
    }
}
