//! Tests of [`super`].

use super::*;
use layerd::layers::{affine, convolution, pooling};
use ndarray::{Array1, ArrayView};

fn array<D: ndarray::Dimension>(t: &pb::Tensor, dim: D) -> ndarray::Array<f32, D> {
    let values: Vec<f32> = bytemuck::pod_collect_to_vec(&t.data);
    ArrayView::from_shape(dim, &values).unwrap().to_owned()
}

fn bytes(values: impl IntoIterator<Item = f32>) -> Bytes {
    let values: Vec<f32> = values.into_iter().collect();
    Bytes::copy_from_slice(bytemuck::cast_slice(&values))
}

/// The server's own kernels (a different route: gemm, im2col) pass the
/// check; the same answers with one element nudged do not.
#[test]
fn the_servers_kernels_pass_and_a_nudged_answer_does_not() {
    let built = build::<f32>(Kind::Affine, &[8, 12]).unwrap();
    let x = array(&built.x, ndarray::Ix2(8, 12));
    let w = array(&built.params["W"], ndarray::Ix2(12, 100));
    let b: Array1<f32> = array(&built.params["b"], ndarray::Ix1(100));
    let y = affine::forward(x.view(), w.view(), b.view());
    let mut nudged = y.clone();
    nudged[[3, 7]] += 0.1;
    assert!(!built.check.check(Answer::Y(&bytes(nudged))));
    assert!(built.check.check(Answer::Y(&bytes(y.iter().copied()))));
    let dout = array(built.dout.as_ref().unwrap(), ndarray::Ix2(8, 100));
    let g = affine::backward(x.view(), w.view(), dout.view(), true);
    let grads = HashMap::from([
        (
            "W".to_string(),
            tensor(&[12, 100], g.dw.as_slice().unwrap()),
        ),
        ("b".to_string(), tensor(&[100], g.db.as_slice().unwrap())),
    ]);
    let dx = bytes(g.dx.unwrap());
    let y = Bytes::new();
    let mut missing = grads.clone();
    missing.remove("b");
    let backward = |grads| Answer::Backward {
        dx: &dx,
        grads,
        y: &y,
    };
    assert!(!built.check.check(backward(&missing)));
    assert!(built.check.check(backward(&grads)));

    let built = build::<f32>(Kind::Convolution, &[2, 3, 9, 8]).unwrap();
    let x = array(&built.x, ndarray::Ix4(2, 3, 9, 8));
    let w = array(&built.params["W"], ndarray::Ix4(30, 3, 5, 5));
    let b: Array1<f32> = array(&built.params["b"], ndarray::Ix1(30));
    let g = convolution::Geometry { stride: 1, pad: 0 };
    let y = convolution::forward(x.view(), w.view(), b.view(), g);
    assert_eq!(built.y_shape, vec![2, 30, 5, 4]);
    assert!(built.check.check(Answer::Y(&bytes(y.iter().copied()))));

    let built = build::<f32>(Kind::Pooling, &[2, 3, 7, 6]).unwrap();
    let x = array(&built.x, ndarray::Ix4(2, 3, 7, 6));
    let pool = pooling::Pool {
        pool_h: 2,
        pool_w: 2,
        stride: 2,
        pad: 0,
    };
    let (y, _) = pooling::forward(x.view(), pool);
    assert!(built.check.check(Answer::Y(&bytes(y.iter().copied()))));
    // Once an answer is accepted, later ones must be the same bytes: one
    // ulp off (well within the tolerance) is refused.
    let mut nudged = y.clone();
    nudged[[1, 2, 0, 1]] = f32::from_bits(nudged[[1, 2, 0, 1]].to_bits() + 1);
    assert!(!built.check.check(Answer::Y(&bytes(nudged))));
}

#[test]
fn dropout_answers_must_be_x_or_zero_and_keep_about_half() {
    let built = build::<f32>(Kind::Dropout, &[4000]).unwrap();
    let x = array(&built.x, ndarray::Ix1(4000));
    let kept_every_other = x
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 2 == 0 { v } else { v * 0.0 });
    assert!(built.check.check(Answer::Y(&bytes(kept_every_other))));
    assert!(!built.check.check(Answer::Y(&bytes(x.iter().copied()))));
    let halved = x
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 2 == 0 { v * 0.5 } else { 0.0 });
    assert!(!built.check.check(Answer::Y(&bytes(halved))));
}
