//! Builds the eBPF programs (`ebpf/`, nightly, bpfel-unknown-none) into OUT_DIR, where
//! `include_bytes_aligned!` embeds them. Set AYA_BUILD_SKIP=1 to skip (e.g. for docs).
//! Also names the commit built, for `vsrscope_build_info`.

use std::path::Path;
use std::process::Command;

fn main() -> anyhow::Result<()> {
    revision();
    let ebpf = aya_build::Package {
        name: "vsrscope-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        no_default_features: false,
        features: &[],
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

/// Sets VSRSCOPE_REVISION to the commit checked out, or "unknown" outside a git checkout (a
/// crate tarball, say), and reruns when HEAD moves.
fn revision() {
    let git = |arguments: &[&str]| -> Option<String> {
        let output = Command::new("git")
            .args(arguments)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=VSRSCOPE_REVISION={revision}");
    // HEAD, and the branch it names; a ref only in packed-refs has no file of its own, and
    // watching a missing file would rerun this script on every build.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for reference in ["HEAD"].into_iter().chain(branch.as_deref()) {
        if let Some(file) = git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            reference,
        ]) && Path::new(&file).exists()
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
