//! `slora-plan compare A B`: two runs of one scenario side by side, usually a simulation
//! against a live execution on a GPU. The work is in `slora_reports::compare`; this module
//! only resolves paths, prints, and maps failures to exit codes.

use slora_reports::{compare, load_run, pick_reference, write_comparison, ReportError};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// A run folder written by `simulate` (or `simulate --execute`), or its metrics.json
    /// (either file of a folder may be gzipped: metrics.json.gz, requests.csv.gz). The
    /// reference, unless only B was executed on a GPU.
    pub a: PathBuf,
    /// The other run (folder or metrics.json). The executed run is the reference when exactly
    /// one of A and B was executed; otherwise A is.
    pub b: PathBuf,
    /// Output folder. Default: out/compare-<scenario name>/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print nothing but warnings and errors (no table).
    #[arg(long)]
    pub quiet: bool,
}

/// Why `compare` failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A run could not be read: bad input.
    #[error("compare: {0}")]
    BadRun(#[source] ReportError),
    /// The comparison could not be written.
    #[error("compare: writing outputs: {0}")]
    Output(#[source] ReportError),
}

impl CompareError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CompareError::BadRun(_) => 2,
            CompareError::Output(_) => 1,
        }
    }
}

pub fn run(args: &CompareArgs) -> Result<(), CompareError> {
    let first = load_run(&args.a).map_err(CompareError::BadRun)?;
    let second = load_run(&args.b).map_err(CompareError::BadRun)?;
    let (reference, predicted) = pick_reference(&first, &second);
    let cmp = compare(reference, predicted);
    // Warnings go to stderr even with --quiet: they say the numbers may mean little.
    for w in &cmp.warnings {
        eprintln!("slora-plan: warning: {w}");
    }
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => default_out(&cmp.reference.scenario),
    };
    let written =
        write_comparison(&cmp, reference, predicted, &out).map_err(CompareError::Output)?;
    if !args.quiet {
        print!("{}", cmp.to_markdown());
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        println!("Wrote {} to {}", names.join(", "), out.display());
    }
    Ok(())
}

/// `out/compare-<scenario>`, with path separators in the name made harmless.
fn default_out(scenario: &str) -> PathBuf {
    let name: String = scenario
        .chars()
        .map(|c| if matches!(c, '/' | '\\') { '_' } else { c })
        .collect();
    Path::new("out").join(format!("compare-{name}"))
}
