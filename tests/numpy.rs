//! `einfuse run --target interp` on softmax attention with `.npy` inputs written by NumPy gives
//! `.npy` outputs within 1e-5 of NumPy's own softmax attention.
//!
//! The Python interpreter is `$EINFUSE_PYTHON`, else `.venv/bin/python`, else `python3`
//! (`scripts/test.sh` makes `.venv` with NumPy). Without NumPy the test prints why and skips,
//! except under CI, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("EINFUSE_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

const SCRIPT: &str = r#"
import subprocess, sys
import numpy as np
einfuse, work = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(7)
E, P, M = 64, 33, 100
q = rng.standard_normal((E, P)).astype(np.float32)
k = rng.standard_normal((E, M)).astype(np.float32)
v = rng.standard_normal((E, M)).astype(np.float32)
for name, a in (("q", q), ("k", k), ("v", v)):
    np.save(f"{work}/{name}.npy", a)
for kernel in ("attention", "attention_1pass"):
    subprocess.run([einfuse, "run", "examples/attention.ein", "--kernel", kernel, "--target", "interp",
                    "--input", f"Q={work}/q.npy", "--input", f"K={work}/k.npy", "--input", f"V={work}/v.npy",
                    "--output", f"AV={work}/av.npy"], check=True)
    av = np.load(f"{work}/av.npy")
    s = (q.astype(np.float64).T @ k.astype(np.float64)) * 0.125
    w = np.exp(s - s.max(axis=1, keepdims=True))
    want = ((w / w.sum(axis=1, keepdims=True)) @ v.astype(np.float64).T).T
    err = np.abs(av - want).max()
    print(kernel, av.shape, av.dtype, "max abs error", err)
    assert av.shape == (E, P) and av.dtype == np.float32
    assert err < 1e-5, err
"#;

#[test]
fn interpreter_matches_numpy_attention() {
    let python = python();
    let has_numpy = Command::new(&python).args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    if !has_numpy {
        let why = format!("{} cannot import numpy (run scripts/test.sh, which makes .venv)", python.display());
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    }
    let work = std::env::temp_dir().join(format!("einfuse-numpy-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let output = Command::new(&python)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-c", SCRIPT, env!("CARGO_BIN_EXE_einfuse"), work.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&work);
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    println!("{text}");
}
