//! The analysis scripts under `scripts/` that read only committed files: run with the
//! machine's `python3` (standard library only), they must reproduce what docs/FIDELITY.md
//! quotes from them. Without `python3` each test prints a skip line and passes.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `python3 scripts/<script> <args>` from the repository root: (exit code, stdout, stderr), or
/// `None` where no `python3` runs.
fn python(script: &str, args: &[&str]) -> Option<(i32, String, String)> {
    let out = Command::new("python3")
        .arg(repo().join("scripts").join(script))
        .args(args)
        .current_dir(repo())
        .output()
        .ok()?;
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The embedded H100 profile of Llama-3-8B (8 KV heads): the fitted wave size is where its
/// decode attention jumps (792 work units), and steps at the wave crossings interpolate the
/// grid better than straight lines (docs/FIDELITY.md, session 23).
#[test]
fn attention_waves_finds_the_gqa_wave_size() {
    let Some((code, out, err)) = python(
        "attention_waves.py",
        &["sim/profiles/h100-sxm-llama-3-8b.json"],
    ) else {
        println!("skipped: no python3");
        return;
    };
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("llama-3-8b: 8 KV heads"), "{out}");
    assert!(
        out.contains("- linear: median 2.4%, mean 6.4%, largest 31.9%"),
        "{out}"
    );
    assert!(
        out.contains(
            "- steps at wave crossings, 792 units a wave: median 1.8%, mean 3.1%, largest 22.4%"
        ),
        "{out}"
    );
}

/// Bad input names the file or the option, exits non-zero and prints no traceback.
#[test]
fn attention_waves_refuses_bad_input() {
    let missing = "no/such/profile.json";
    let Some((code, _, err)) = python("attention_waves.py", &[missing]) else {
        println!("skipped: no python3");
        return;
    };
    assert_ne!(code, 0);
    assert!(err.contains(missing) && !err.contains("Traceback"), "{err}");
    let (code, _, err) = python(
        "attention_waves.py",
        &["sim/profiles/h100-sxm-llama-3-8b.json", "--wave-size", "0"],
    )
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("--wave-size must be positive, got 0") && !err.contains("Traceback"),
        "{err}"
    );
    // A file that is not JSON, and JSON that is not a profile or not a measurement.
    let (code, _, err) = python("attention_waves.py", &["Cargo.toml"]).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("Cargo.toml") && !err.contains("Traceback"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("slora-attention-waves-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list = dir.join("list.json");
    std::fs::write(&list, "[1, 2]").unwrap();
    let (code, _, err) = python("attention_waves.py", &[list.to_str().unwrap()]).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("list.json: not a calibrated profile") && !err.contains("Traceback"),
        "{err}"
    );
    let raw = dir.join("raw.json");
    std::fs::write(
        &raw,
        r#"{"spread_decode_steps": [{"pattern": "p", "contexts": [], "attention": {"median_s": 0.001}}]}"#,
    )
    .unwrap();
    let (code, _, err) = python(
        "attention_waves.py",
        &[
            "sim/profiles/h100-sxm-llama-3-8b.json",
            "--raw",
            raw.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("raw.json: spread_decode_steps[0]: ValueError: no contexts")
            && !err.contains("Traceback"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
