//! Prepares the kernel sources of `../device/` for a host build, where the compiler is a
//! nightly (the kernels use `f16` and `repr(simd)`): the crate's `kernel_emu` cfg is set only
//! then, and on a stable compiler the crate is empty.
//!
//! The host copy differs from the device source in three mechanical ways, done here as text
//! so the device source stays the single source: kernel entries lose `extern "ptx-kernel"`
//! and `#[unsafe(no_mangle)]`, and each `impl Copy for T {}` gains the `Clone` impl that
//! `core`'s `Copy` requires (the device prelude's `Copy` has no supertrait). The modules
//! `prelude` and `intrinsics` are not copied: `src/` supplies the host versions.

use std::{env, fs, path::PathBuf, process::Command};

const HOST_SUPPLIED: [&str; 3] = ["lib.rs", "prelude.rs", "intrinsics.rs"];

fn main() {
    let device = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../device");
    println!("cargo:rerun-if-changed={}", device.display());
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    fs::write(out.join("modules.rs"), "").unwrap();
    if !version.contains("nightly") {
        return;
    }
    println!("cargo:rustc-cfg=kernel_emu");

    let mut modules = String::new();
    let mut names: Vec<_> = fs::read_dir(&device)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".rs") && !HOST_SUPPLIED.contains(&n.as_str()))
        .collect();
    names.sort();
    for name in names {
        let src = fs::read_to_string(device.join(&name)).unwrap();
        let host = to_host(&src);
        let path = out.join(&name);
        fs::write(&path, host).unwrap();
        let module = name.trim_end_matches(".rs");
        modules += &format!(
            "#[path = {:?}]\n#[allow(dead_code, unused_imports, unnecessary_transmutes, clippy::all)]\npub mod {module};\n",
            path.display().to_string()
        );
    }
    fs::write(out.join("modules.rs"), modules).unwrap();
}

fn to_host(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let trimmed = line.trim();
        if trimmed == "#[unsafe(no_mangle)]" {
            continue;
        }
        let line = line.replace("extern \"ptx-kernel\" ", "");
        if let Some(ty) = trimmed
            .strip_prefix("impl Copy for ")
            .and_then(|rest| rest.strip_suffix(" {}"))
        {
            out += &format!(
                "{line}\nimpl Clone for {ty} {{\n    fn clone(&self) -> Self {{\n        *self\n    }}\n}}\n"
            );
            continue;
        }
        out += &line;
        out.push('\n');
    }
    out
}
