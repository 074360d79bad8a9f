use candle_ascend_ops::testing::Rng;
use candle_core::DType;
fn main() {
    let mut rng = Rng::seeded(1);
    for kv in [16usize, 64, 128, 256, 512] {
        let q = rng.tensor(&[1, 1, 9, 64], -2.0, 2.0, DType::F32).unwrap();
        let k = rng.tensor(&[1, 2048, 3, 64], -2.0, 2.0, DType::F32).unwrap();
        let v = rng.tensor(&[1, 2048, 3, 64], -1.0, 1.0, DType::F32).unwrap();
        let mut best = std::time::Duration::MAX;
        let mut med = vec![];
        for _ in 0..30 {
            let t0 = std::time::Instant::now();
            for _ in 0..200 {
                candle_ascend_ops::decode_attention(&q, &k, &v, &[kv], 0.125).unwrap();
            }
            best = best.min(t0.elapsed() / 200);
            med.push(t0.elapsed() / 200);
        }
        med.sort();
        println!("global pool kv={kv}: best {:?} median {:?}", best, med[15]);
    }
}
