//! Prepares the kernel sources of `../device/` for a host build, where the compiler is a
//! nightly (the kernels use `f16` and `repr(simd)`): the crate's `kernel_emu` cfg is set only
//! then, and on a stable compiler the crate is empty.
//!
//! The host copy differs from the device source in three mechanical ways, done here as text
//! so the device source stays the single source: kernel entries lose `extern "ptx-kernel"`
//! and `#[unsafe(no_mangle)]`, and each `impl Copy for T {}` gains the `Clone` impl that
//! `core`'s `Copy` requires (the device prelude's `Copy` has no supertrait). The modules
//! `prelude` and `intrinsics` are not copied: `src/` supplies the host versions.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

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
    fs::write(out.join("entries.rs"), "").unwrap();
    if !version.contains("nightly") {
        return;
    }
    println!("cargo:rustc-cfg=kernel_emu");

    let mut modules = String::new();
    let mut module_names = Vec::new();
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
        module_names.push(module.to_string());
        modules += &format!(
            "#[path = {:?}]\n#[allow(dead_code, unused_imports, unnecessary_transmutes, clippy::all)]\npub mod {module};\n",
            path.display().to_string()
        );
    }
    fs::write(out.join("modules.rs"), modules).unwrap();
    fs::write(
        out.join("entries.rs"),
        entries(&device.join("../ptx/retouch.sm_80.ptx"), &module_names),
    )
    .unwrap();
}

/// The kernel entry table for launches by name (the emulated driver's `cuLaunchKernel`):
/// every `.entry` of the committed PTX with its parameter count, calling the host build of
/// the kernel with each parameter read from the launch's argument pointers (types inferred
/// from the kernel's signature). CI checks that PTX is current with the sources.
fn entries(ptx: &Path, modules: &[String]) -> String {
    println!("cargo:rerun-if-changed={}", ptx.display());
    let ptx = fs::read_to_string(ptx).unwrap();
    let mut out = format!(
        "#[allow(unused_imports)]\nmod all {{\n    pub use crate::{{{}}};\n}}\n\n",
        modules
            .iter()
            .map(|m| format!("{m}::*"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out += "/// The kernel called `name`, if the PTX has it.\npub fn entry(name: &str) -> Option<Entry> {\n    match name {\n";
    for (name, sizes) in ptx_entries(&ptx) {
        let args: Vec<_> = (0..sizes.len()).map(|i| format!("arg(p, {i})")).collect();
        out += &format!(
            "        {name:?} => Some(Entry {{ params: {}, sizes: &{sizes:?}, call: |p| unsafe {{ all::{name}({}) }} }}),\n",
            sizes.len(),
            args.join(", ")
        );
    }
    out += "        _ => None,\n    }\n}\n";
    out
}

/// `(name, parameter sizes in bytes)` of each `.visible .entry` in a PTX file.
fn ptx_entries(ptx: &str) -> Vec<(String, Vec<usize>)> {
    let mut found = Vec::new();
    for (at, _) in ptx.match_indices(".visible .entry ") {
        let rest = &ptx[at + ".visible .entry ".len()..];
        let name = &rest[..rest.find('(').unwrap()];
        let params = &rest[..rest.find(')').unwrap()];
        let sizes = params
            .split(".param ")
            .skip(1)
            .map(|param| {
                let ty = param.split_whitespace().next().unwrap();
                match &ty[2..] {
                    "64" => 8,
                    "32" => 4,
                    "16" => 2,
                    "8" => 1,
                    _ => panic!("{name}: parameter type {ty} not known"),
                }
            })
            .collect();
        found.push((name.to_string(), sizes));
    }
    found
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
