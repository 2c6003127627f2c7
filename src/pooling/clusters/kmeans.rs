//! The k-means the cluster layers initialise from data with: Euclidean (NetVLAD) or spherical
//! (OTK), with one deterministic seeding and Lloyd loop for both.

use burn::tensor::{Int, Tensor};

/// Squared Euclidean distances `[M, K]` between rows `[M, C]` and centres `[K, C]`, ≥ 0.
pub(super) fn squared_distances(rows: Tensor<2>, centres: Tensor<2>) -> Tensor<2> {
    let row_norms = rows.clone().square().sum_dim(1);
    let centre_norms = centres.clone().square().sum_dim(1).transpose();
    (row_norms + centre_norms - rows.matmul(centres.transpose()).mul_scalar(2.0)).clamp_min(0.0)
}

/// k-means of `rows` `[M, C]` into `clusters` centres `[K, C]`: greedy farthest-point seeding
/// from row 0 (the row farthest, squared Euclidean, from the centres so far; ties to the
/// lowest index), then at most `iterations` Lloyd rounds (assign to the nearest centre, move
/// each centre to its members' mean), stopped when no assignment changes (one host read per
/// round). A cluster left empty keeps its centre.
///
/// **Spherical** (`spherical = true`, the rows L2-normalised by the caller): each mean is
/// L2-normalised back onto the sphere (a mean of norm below 1e-6, members that cancel, keeps
/// its centre instead). On unit rows and unit centres ‖x − c‖² = 2 − 2 xᵀc, so the seeding is
/// farthest in cosine and the assignment is to the largest cosine: spherical k-means
/// (Dhillon & Modha), what OTK's `spherical_kmeans` computes.
pub(super) fn kmeans(
    rows: Tensor<2>,
    clusters: usize,
    iterations: usize,
    spherical: bool,
) -> Tensor<2> {
    let [count, channels] = rows.dims();
    let device = rows.device();
    let distance_to = |row: usize| {
        let centre = rows.clone().slice([row..row + 1, 0..channels]);
        (rows.clone() - centre)
            .square()
            .sum_dim(1)
            .squeeze_dim::<1>(1)
    };
    let mut chosen = vec![0i64];
    let mut nearest = distance_to(0);
    while chosen.len() < clusters {
        let next = nearest.clone().argmax(0).into_scalar::<i64>();
        chosen.push(next);
        nearest = nearest.min_pair(distance_to(next as usize));
    }
    let indices = Tensor::<1, Int>::from_data(chosen.as_slice(), &device);
    let mut centres = rows.clone().select(0, indices);
    let mut previous: Option<Tensor<1, Int>> = None;
    for _ in 0..iterations {
        let labels = squared_distances(rows.clone(), centres.clone())
            .argmin(1)
            .reshape([count]);
        if let Some(previous) = &previous
            && previous
                .clone()
                .equal(labels.clone())
                .all()
                .into_scalar::<bool>()
        {
            break;
        }
        let members: Tensor<2> = labels.clone().float().one_hot(clusters); // [M, K]
        let sizes = members.clone().sum_dim(0).transpose(); // [K, 1]
        let sums = members.transpose().matmul(rows.clone()); // [K, C]
        let means = sums / sizes.clone().clamp_min(1.0);
        let empty = sizes.lower_equal_elem(0.0);
        let (means, keep) = if spherical {
            let norms = means.clone().square().sum_dim(1).sqrt(); // [K, 1]
            let degenerate = norms.clone().lower_elem(1e-6);
            (means / norms.clamp_min(1e-6), empty.bool_or(degenerate))
        } else {
            (means, empty)
        };
        centres = means.mask_where(keep.expand([clusters, channels]), centres);
        previous = Some(labels);
    }
    centres
}
