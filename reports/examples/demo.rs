//! Writes a synthetic run and sweep report, to look at the charts:
//! `cargo run -p slora-reports --example demo -- OUT_DIR [REQUESTS STEPS ADAPTERS]`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        eprintln!("usage: demo OUT_DIR [REQUESTS STEPS ADAPTERS]");
        return ExitCode::from(2);
    };
    let number = |i: usize, default: u64| {
        args.get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let run = common::run(number(1, 400), number(2, 3_000), number(3, 12) as u32);
    let sweep = common::sweep(&[8, 64, 512], &[1.0, 2.0, 4.0, 8.0, 16.0]);
    let started = Instant::now();
    let result = slora_reports::write_run(&out.join("run"), &run)
        .and_then(|_| slora_reports::write_sweep(&out.join("sweep"), &sweep));
    match result {
        Ok(_) => {
            println!("wrote {} in {:.2?}", out.display(), started.elapsed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
