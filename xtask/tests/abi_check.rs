//! `cargo xtask abi-check` without CANN: a fake toolkit whose headers we write here (a few declarations shaped
//! like ours; not CANN header text) must pass, and the same toolkit with one argument type or one enumerator value
//! changed must fail naming the symbol. Without a toolkit the command must say so and fail.

use std::path::Path;
use std::process::{Command, Output};

const ACL_H: &str = r#"/* abi-check test fixture: written for candle-ascend's tests. */
#ifndef FIXTURE_ACL_H
#define FIXTURE_ACL_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
typedef int aclError;
typedef void *aclrtStream;
static const int ACL_SUCCESS = 0;
#define ACL_ERROR_INVALID_PARAM 100000
typedef enum { ACL_DT_UNDEFINED = -1, ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_BF16 = @BF16@ } aclDataType;
aclError aclInit(const char *configPath);
aclError aclrtCreateStream(aclrtStream *stream);
aclError aclrtSynchronizeStream(const aclrtStream stream);
#ifdef __cplusplus
}
#endif
#endif
"#;

const META_H: &str = r#"/* abi-check test fixture: written for candle-ascend's tests. */
#pragma once
#include <cstdint>
#include "acl/acl.h"
typedef struct aclTensor aclTensor;
typedef struct aclOpExecutor aclOpExecutor;
typedef int32_t aclnnStatus;
extern "C" aclnnStatus aclDestroyTensor(const aclTensor *tensor);
"#;

const RMS_NORM_H: &str = r#"/* abi-check test fixture: written for candle-ascend's tests. */
#pragma once
#include "aclnn/acl_meta.h"
extern "C" {
aclnnStatus aclnnRmsNormGetWorkspaceSize(const aclTensor *x, const aclTensor *gamma, @EPS@ epsilon,
    const aclTensor *yOut, const aclTensor *rstdOut, uint64_t *workspaceSize, aclOpExecutor **executor);
aclnnStatus aclnnRmsNorm(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, const aclrtStream stream);
}
"#;

/// Not at the conventional `aclnn_cast.h`: abi-check must find it by searching the folder.
const CAST_H: &str = r#"/* abi-check test fixture: written for candle-ascend's tests. */
#pragma once
#include "aclnn/acl_meta.h"
extern "C" aclnnStatus aclnnCastGetWorkspaceSize(const aclTensor *self, aclDataType dtype, aclTensor *out,
    uint64_t *workspaceSize, aclOpExecutor **executor);
extern "C" aclnnStatus aclnnCast(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream);
"#;

fn fake_toolkit(dir: &Path, epsilon_type: &str, bf16: &str) {
    let include = dir.join("include");
    for sub in ["acl", "aclnn", "aclnnop"] {
        std::fs::create_dir_all(include.join(sub)).unwrap();
    }
    std::fs::write(include.join("acl/acl.h"), ACL_H.replace("@BF16@", bf16)).unwrap();
    std::fs::write(include.join("aclnn/acl_meta.h"), META_H).unwrap();
    std::fs::write(include.join("aclnnop/aclnn_rms_norm.h"), RMS_NORM_H.replace("@EPS@", epsilon_type)).unwrap();
    std::fs::write(include.join("aclnnop/aclnn_cast_ops.h"), CAST_H).unwrap();
}

fn abi_check(toolkit: Option<&Path>) -> (Output, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("abi-check").env_remove("ASCEND_TOOLKIT_HOME");
    if let Some(t) = toolkit {
        cmd.arg("--toolkit").arg(t);
    }
    let out = cmd.output().expect("running xtask");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    (out, text)
}

#[test]
fn matching_fake_toolkit_passes() {
    let dir = tempfile::tempdir().unwrap();
    fake_toolkit(dir.path(), "double", "27");
    let (out, text) = abi_check(Some(dir.path()));
    assert!(out.status.success(), "abi-check failed on matching headers:\n{text}");
    assert!(!text.contains("MISMATCH"), "{text}");
    // 1 struct mapping + enum size + 4 enumerators + aclError/aclrtStream/aclnnStatus... are counted in `matched`.
    let matched: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("abi-check: ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary line:\n{text}"));
    assert!(matched >= 20, "only {matched} symbols matched:\n{text}");
    // Declared by us but not by the fixture: reported as absent, not as mismatches.
    assert!(text.contains("function aclrtMalloc") && text.contains("no header found for operator(s)"), "{text}");
    let absent_line = text.lines().find(|l| l.starts_with("absent from")).unwrap_or("");
    for checked in ["aclnnRmsNormGetWorkspaceSize", "aclnnCastGetWorkspaceSize", "aclrtSynchronizeStream", "ACL_BF16"] {
        assert!(!absent_line.contains(&format!("{checked},")), "{checked} was not checked:\n{text}");
    }
}

#[test]
fn changed_argument_type_fails_naming_the_function() {
    let dir = tempfile::tempdir().unwrap();
    fake_toolkit(dir.path(), "float", "27");
    let (out, text) = abi_check(Some(dir.path()));
    assert!(!out.status.success(), "abi-check passed with a float epsilon:\n{text}");
    assert!(text.contains("MISMATCH function aclnnRmsNormGetWorkspaceSize"), "{text}");
    assert!(text.contains("1 mismatch(es)"), "{text}");
    // Both declarations are shown, since the compiler names neither type.
    assert!(
        text.contains("ours: aclnnStatus aclnnRmsNormGetWorkspaceSize(") && text.contains("double epsilon"),
        "{text}"
    );
    assert!(text.contains("toolkit (") && text.contains("float epsilon"), "{text}");
}

#[test]
fn changed_enumerator_value_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    fake_toolkit(dir.path(), "double", "28");
    let (out, text) = abi_check(Some(dir.path()));
    assert!(!out.status.success(), "abi-check passed with ACL_BF16 = 28:\n{text}");
    assert!(text.contains("MISMATCH enumerator aclDataType::ACL_BF16"), "{text}");
    assert!(text.contains("1 mismatch(es)"), "{text}");
}

#[test]
fn without_a_toolkit_it_says_so_and_fails() {
    let (out, text) = abi_check(None);
    assert!(!out.status.success());
    assert!(text.contains("ASCEND_TOOLKIT_HOME") && text.contains("Nothing was checked"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let (out, text) = abi_check(Some(dir.path()));
    assert!(!out.status.success() && text.contains("acl/acl.h not found"), "{text}");
}
