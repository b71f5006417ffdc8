//! Criterion benchmarks of the CPU kernels, over the same cases as `retouch bench`
//! (`retouch_kernels::bench::suite`): GEMM, conv 3x3, attention and the memory-bound ops at
//! SD1.5 shapes, and the masked conv and masked attention at mask ratios 5-100% beside their
//! dense versions.
//!
//! `cargo bench -p retouch-benches` runs everything; add a filter (`-- masked`) for a subset.
//! Throughput is reported in FLOP/s (criterion's "elements" are FLOPs here), and in bytes/s of the
//! least traffic for the memory-bound ops (group norm, layer norm, GEGLU, add).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use retouch_kernels::bench::{Target, suite};

fn kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for case in suite(&Target::Cpu, false) {
        // CPU cases do their work once per call.
        let mut run = (case.setup)().expect("benchmark inputs").run;
        group.throughput(if case.flops > 0.0 {
            Throughput::Elements(case.flops as u64)
        } else {
            Throughput::Bytes(case.bytes as u64)
        });
        group.bench_function(&case.name, |b| b.iter(|| run().expect("kernel runs")));
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
