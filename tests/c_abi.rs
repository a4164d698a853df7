//! `einfuse compile --target cpu` and `--target cpu-llvm` write an object file and a C header that
//! a small C program links and calls correctly (built with the system C compiler, as the position-
//! independent executable it makes by default).

use std::process::Command;

use einfuse::{DType, Program, RunOptions, Target, Tensor};

const MAIN_C: &str = r#"
#include <stdio.h>
#include "attention.h"

static int read_floats(const char *path, float *data, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t got = fread(data, sizeof(float), n, f);
    fclose(f);
    return got == n;
}

int main(int argc, char **argv) {
    const int64_t E = 64, F = 64, M = 150, P = 7;
    static float q[64 * 7], k[64 * 150], v[64 * 150], av[64 * 7];
    if (argc != 5) return 2;
    if (!read_floats(argv[1], q, E * P) || !read_floats(argv[2], k, E * M) || !read_floats(argv[3], v, F * M)) return 3;
    if (attention(q, k, v, av, M, P) != 0) return 4;
    FILE *out = fopen(argv[4], "wb");
    if (!out) return 5;
    fwrite(av, sizeof(float), F * P, out);
    fclose(out);
    return 0;
}
"#;

fn write_floats(path: &std::path::Path, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_c_program_links_and_calls_the_kernel() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    if Command::new(&cc).arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "no C compiler `{cc}`");
        eprintln!("skipped: no C compiler `{cc}`");
        return;
    }
    for target in ["cpu", "cpu-llvm"] {
        links_and_calls(&cc, target);
    }
}

fn links_and_calls(cc: &str, target: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("einfuse-c-abi-{}-{target}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let object = dir.join("attention.o");
    let status = Command::new(env!("CARGO_BIN_EXE_einfuse"))
        .args(["compile", "--target", target, "--kernel", "attention"])
        .arg(root.join("examples/attention.ein"))
        .arg("-o")
        .arg(&object)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(dir.join("attention.h").exists());
    std::fs::write(dir.join("main.c"), MAIN_C).unwrap();
    let program = dir.join("main");
    let output = Command::new(cc)
        .current_dir(&dir)
        .args(["-O1", "-o"])
        .arg(&program)
        .args(["main.c", "attention.o", "-lm"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let q = Tensor::random(DType::F32, vec![64, 7], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![64, 150], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![64, 150], 3).unwrap();
    for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
        write_floats(&dir.join(format!("{name}.bin")), t.data());
    }
    let status = Command::new(&program)
        .arg(dir.join("q.bin"))
        .arg(dir.join("k.bin"))
        .arg(dir.join("v.bin"))
        .arg(dir.join("av.bin"))
        .status()
        .unwrap();
    assert!(status.success(), "{target}: {status}");
    let bytes = std::fs::read(dir.join("av.bin")).unwrap();
    let got: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();

    let kernels = Program::from_file(&root.join("examples/attention.ein")).unwrap();
    let options = RunOptions { inputs: vec![("Q".into(), q), ("K".into(), k), ("V".into(), v)], ..Default::default() };
    let want = einfuse::run(kernels.kernel(Some("attention")).unwrap(), Target::Interp, &options).unwrap();
    assert_eq!(got.len(), want[0].1.len());
    for (a, b) in got.iter().zip(want[0].1.data()) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{target}: {a} vs {b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
