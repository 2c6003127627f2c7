//! Retrieval metrics for metric learning: Recall@K and MAP@R over embeddings with class
//! labels, ranked by cosine similarity.
//!
//! The protocol is the usual one of metric-learning papers (GSP included): every embedding is
//! a query, the database is every *other* embedding of the evaluation set, and a retrieved
//! item is relevant when it has the query's label. Queries whose class has no other member
//! are skipped (they have nothing to retrieve). Ties in similarity are broken by the lower
//! index, so the results are deterministic.
//!
//! MAP@R (Musgrave, Belongie, Lim, *A Metric Learning Reality Check*, ECCV 2020): for a query
//! with R other members of its class, AP@R = (1/R) Σ_{i=1..R} P(i)·rel(i), where rel(i) says
//! whether the i-th nearest item is relevant and P(i) is the precision of the first i items;
//! MAP@R is its mean over the queries.
//!
//! ```
//! use burn_pooling::retrieval::{evaluate, recall_at_1};
//!
//! let embeddings = vec![vec![1.0, 0.1], vec![1.0, 0.0], vec![0.0, 1.0], vec![0.1, 1.0]];
//! let labels = [0, 0, 1, 1];
//! assert_eq!(recall_at_1(&embeddings, &labels), 1.0);
//! let metrics = evaluate(&embeddings, &labels);
//! assert_eq!((metrics.recall_at_1, metrics.map_at_r), (1.0, 1.0));
//! ```

use burn::tensor::Tensor;

/// Recall@1 and MAP@R of one evaluation set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrievalMetrics {
    /// Fraction of queries whose nearest other item has their label.
    pub recall_at_1: f64,
    /// Mean over the queries of AP@R (see the [module docs](self)).
    pub map_at_r: f64,
    /// Number of queries counted (those whose class has at least two members).
    pub queries: usize,
}

/// The rows of a `[N, D]` tensor, read back to the host as `f32`.
///
/// # Panics
///
/// If the tensor's data cannot be read as `f32`.
pub fn tensor_rows(embeddings: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, dim] = embeddings.dims();
    let values = embeddings
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("tensor_rows: tensor data should convert to f32");
    if dim == 0 {
        return Vec::new();
    }
    values.chunks(dim).map(<[f32]>::to_vec).collect()
}

/// Unit-length copies of the rows (a zero row stays zero).
fn normalized(embeddings: &[Vec<f32>]) -> Vec<Vec<f32>> {
    embeddings
        .iter()
        .map(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter().map(|v| v / norm).collect()
        })
        .collect()
}

fn check(embeddings: &[Vec<f32>], labels: &[usize]) {
    assert!(
        embeddings.len() == labels.len(),
        "retrieval: expected one label per embedding, got {} embeddings and {} labels",
        embeddings.len(),
        labels.len()
    );
    if let Some(first) = embeddings.first() {
        assert!(
            embeddings.iter().all(|row| row.len() == first.len()),
            "retrieval: all embeddings must have the same width"
        );
    }
}

/// Calls `visit(relevant_count, ranked_relevance)` for every query with at least one
/// other member of its class; `ranked_relevance[i]` says whether the (i+1)-th nearest other
/// item (cosine similarity, ties to the lower index) has the query's label.
fn for_each_query(
    embeddings: &[Vec<f32>],
    labels: &[usize],
    mut visit: impl FnMut(usize, &[bool]),
) {
    check(embeddings, labels);
    let unit = normalized(embeddings);
    let count = unit.len();
    let mut order: Vec<(f32, usize)> = Vec::with_capacity(count);
    let mut relevance: Vec<bool> = Vec::with_capacity(count);
    for query in 0..count {
        let relevant = labels
            .iter()
            .enumerate()
            .filter(|&(j, &l)| j != query && l == labels[query])
            .count();
        if relevant == 0 {
            continue;
        }
        order.clear();
        order.extend((0..count).filter(|&j| j != query).map(|j| {
            let similarity = unit[query]
                .iter()
                .zip(&unit[j])
                .map(|(a, b)| a * b)
                .sum::<f32>();
            (similarity, j)
        }));
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        relevance.clear();
        relevance.extend(order.iter().map(|&(_, j)| labels[j] == labels[query]));
        visit(relevant, &relevance);
    }
}

/// Recall@K: the fraction of queries with at least one item of their class among their K
/// nearest other items (cosine similarity). Returns 0 when no query has a class-mate.
///
/// # Panics
///
/// If `embeddings` and `labels` differ in length, the rows differ in width, or `k == 0`.
pub fn recall_at_k(embeddings: &[Vec<f32>], labels: &[usize], k: usize) -> f64 {
    assert!(k > 0, "recall_at_k: k must be at least 1");
    let (mut hits, mut queries) = (0usize, 0usize);
    for_each_query(embeddings, labels, |_, ranked| {
        queries += 1;
        if ranked.iter().take(k).any(|&r| r) {
            hits += 1;
        }
    });
    ratio(hits as f64, queries)
}

/// Recall@1: the fraction of queries whose nearest other item (cosine similarity) has their
/// label. Returns 0 when no query has a class-mate.
///
/// # Panics
///
/// If `embeddings` and `labels` differ in length or the rows differ in width.
pub fn recall_at_1(embeddings: &[Vec<f32>], labels: &[usize]) -> f64 {
    recall_at_k(embeddings, labels, 1)
}

/// MAP@R: the mean over the queries of AP@R = (1/R) Σ_{i≤R} P(i)·rel(i), R the number of other
/// items of the query's class (see the [module docs](self)). Returns 0 when no query has a
/// class-mate.
///
/// # Panics
///
/// If `embeddings` and `labels` differ in length or the rows differ in width.
pub fn map_at_r(embeddings: &[Vec<f32>], labels: &[usize]) -> f64 {
    evaluate(embeddings, labels).map_at_r
}

fn average_precision_at_r(relevant: usize, ranked: &[bool]) -> f64 {
    let mut hits = 0usize;
    let mut sum = 0.0;
    for (i, &is_relevant) in ranked.iter().take(relevant).enumerate() {
        if is_relevant {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    sum / relevant as f64
}

fn ratio(sum: f64, count: usize) -> f64 {
    if count == 0 { 0.0 } else { sum / count as f64 }
}

/// Recall@1 and MAP@R in one pass (one ranking per query).
///
/// # Panics
///
/// If `embeddings` and `labels` differ in length or the rows differ in width.
pub fn evaluate(embeddings: &[Vec<f32>], labels: &[usize]) -> RetrievalMetrics {
    let (mut hits, mut ap_sum, mut queries) = (0usize, 0.0f64, 0usize);
    for_each_query(embeddings, labels, |relevant, ranked| {
        queries += 1;
        if ranked[0] {
            hits += 1;
        }
        ap_sum += average_precision_at_r(relevant, ranked);
    });
    RetrievalMetrics {
        recall_at_1: ratio(hits as f64, queries),
        map_at_r: ratio(ap_sum, queries),
        queries,
    }
}

/// [`evaluate`] on the rows of a `[N, D]` tensor (read back to the host).
///
/// # Panics
///
/// If `labels` does not have N entries.
pub fn evaluate_tensor(embeddings: Tensor<2>, labels: &[usize]) -> RetrievalMetrics {
    evaluate(&tensor_rows(embeddings), labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// Unit vectors in the plane at the given angles (degrees).
    fn at_angles(degrees: &[f32]) -> Vec<Vec<f32>> {
        degrees
            .iter()
            .map(|d| {
                let r = d.to_radians();
                vec![r.cos(), r.sin()]
            })
            .collect()
    }

    // Angles 0, 7, 20, 31, 45, 63 with labels a a b a b b. Rankings by angular distance:
    // q0: a b a b b   -> hit, AP@2 = (1 + 0)/2   = 0.5
    // q1: a b a b b   -> hit, AP@2 = 0.5
    // q2: a a a b b   -> miss, AP@2 = 0
    // q3: b b a a b   -> miss, AP@2 = 0
    // q4: a b b a a   -> miss, AP@2 = (0 + 1/2)/2 = 0.25
    // q5: b a b a a   -> hit, AP@2 = (1 + 0)/2   = 0.5
    // Recall@1 = 3/6, MAP@R = 1.75/6, Recall@2 = 4/6 (q4 finds b at rank 2).
    fn mixed() -> (Vec<Vec<f32>>, Vec<usize>) {
        (
            at_angles(&[0.0, 7.0, 20.0, 31.0, 45.0, 63.0]),
            vec![0, 0, 1, 0, 1, 1],
        )
    }

    #[test]
    fn perfect_ranking_gives_one() {
        let embeddings = at_angles(&[0.0, 3.0, 5.0, 80.0, 85.0, 90.0]);
        let labels = [2, 2, 2, 7, 7, 7];
        let metrics = evaluate(&embeddings, &labels);
        assert_eq!(metrics.recall_at_1, 1.0);
        assert_eq!(metrics.map_at_r, 1.0);
        assert_eq!(metrics.queries, 6);
    }

    #[test]
    fn worst_ranking_gives_zero() {
        // Each item's class-mate is the farthest item.
        let embeddings = at_angles(&[0.0, 10.0, 80.0, 90.0]);
        let labels = [0, 1, 1, 0];
        let metrics = evaluate(&embeddings, &labels);
        assert_eq!(metrics.recall_at_1, 0.0);
        assert_eq!(metrics.map_at_r, 0.0);
    }

    #[test]
    fn mixed_case_matches_hand_computation() {
        let (embeddings, labels) = mixed();
        let metrics = evaluate(&embeddings, &labels);
        assert!((metrics.recall_at_1 - 0.5).abs() < 1e-12);
        assert!((metrics.map_at_r - 1.75 / 6.0).abs() < 1e-12);
        assert!((recall_at_1(&embeddings, &labels) - 0.5).abs() < 1e-12);
        assert!((map_at_r(&embeddings, &labels) - 1.75 / 6.0).abs() < 1e-12);
        assert!((recall_at_k(&embeddings, &labels, 2) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(recall_at_k(&embeddings, &labels, 5), 1.0);
    }

    #[test]
    fn uses_cosine_not_euclidean_distance() {
        // Scaling rows changes Euclidean distances, not the ranking by cosine.
        let (embeddings, labels) = mixed();
        let scaled: Vec<Vec<f32>> = embeddings
            .iter()
            .enumerate()
            .map(|(i, row)| row.iter().map(|v| v * (1.0 + 10.0 * i as f32)).collect())
            .collect();
        assert_eq!(evaluate(&scaled, &labels), evaluate(&embeddings, &labels));
    }

    #[test]
    fn singleton_classes_are_not_queries() {
        // Item 2 is alone in its class: it is skipped as a query but still a distractor.
        let embeddings = at_angles(&[0.0, 30.0, 10.0]);
        let labels = [0, 0, 1];
        let metrics = evaluate(&embeddings, &labels);
        assert_eq!(metrics.queries, 2);
        // q0: distractor first (10° < 30°) -> miss; q1: distractor (20°) first -> miss.
        assert_eq!(metrics.recall_at_1, 0.0);
        assert_eq!(metrics.map_at_r, 0.0);
        assert_eq!(evaluate(&embeddings[..1], &labels[..1]).queries, 0);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        // Items 1 and 2 are equally similar to item 0; item 1 (wrong class) wins the tie.
        let embeddings = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.0, -1.0]];
        let labels = [0, 1, 0];
        let metrics = evaluate(&embeddings, &labels);
        // q0: [1 (miss), 2 (hit)] -> miss; q2: [0 (hit, cos 0), 1 (cos -1)] -> hit.
        assert_eq!(metrics.recall_at_1, 0.5);
    }

    #[test]
    fn tensor_input_matches_slices() {
        let (embeddings, labels) = mixed();
        let device = Device::flex();
        let flat: Vec<f32> = embeddings.iter().flatten().copied().collect();
        let tensor = Tensor::<1>::from_floats(flat.as_slice(), &device).reshape([6, 2]);
        assert_eq!(tensor_rows(tensor.clone()), embeddings);
        assert_eq!(
            evaluate_tensor(tensor, &labels),
            evaluate(&embeddings, &labels)
        );
    }

    #[test]
    #[should_panic(expected = "one label per embedding")]
    fn rejects_mismatched_labels() {
        evaluate(&[vec![1.0], vec![2.0]], &[0]);
    }
}
