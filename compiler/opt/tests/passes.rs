//! Each pass on small IR in the text form: the expected output, and (in `check`) the same
//! interpreter results before and after on generated inputs. Most cases run `dce` after the
//! pass so that the expected text shows only what is left.

mod common;

use common::{assert_same_results, check, check_unchanged};
use kiln_ir::parse_module;

// ---------------------------------------------------------------------------------------
// canonicalize
// ---------------------------------------------------------------------------------------

#[test]
fn canonicalize_removes_identity_ops() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0 "x": f32[S, 4], %1: f32[S, 4]) -> (f32[S, 4]) {
          %2 = cast {to = f32} %0 : f32[S, 4]
          %3 = reshape {shape = [S, 4]} %2 : f32[S, 4]
          %4 = permute {perm = [0, 1]} %3 : f32[S, 4]
          %5 = broadcast_to {shape = [S, 4]} %4 : f32[S, 4]
          %6 = slice {axis = 0, start = 0, end = S, step = 1} %5 : f32[S, 4]
          %7 = slice {axis = 1, start = 0, end = 4, step = 1} %6 : f32[S, 4]
          %8 = concat {axis = 1} %7 : f32[S, 4]
          %9 = add %8, %1 : f32[S, 4]
          return %9
        }
        "#,
        r#"
        func @f(%0 "x": f32[S, 4], %1: f32[S, 4]) -> (f32[S, 4]) {
          %2 = add %0, %1 : f32[S, 4]
          return %2
        }
        "#,
    );
}

#[test]
fn canonicalize_keeps_ops_that_change_the_type() {
    check_unchanged(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: f32[4], %1: f32[1]) -> (f32[4, 4], f32[S], bf16[4], f32[1, 4], f32[2]) {
          // x * 1 broadcasts x to a larger shape here.
          %2 = full {value = 1.0, dtype = f32, shape = [4, 4]} : f32[4, 4]
          %3 = mul %0, %2 : f32[4, 4]
          %4 = full {value = 1.0, dtype = f32, shape = [S]} : f32[S]
          %5 = mul %1, %4 : f32[S]
          %6 = cast {to = bf16} %0 : bf16[4]
          %7 = reshape {shape = [1, 4]} %0 : f32[1, 4]
          %8 = slice {axis = 0, start = 0, end = 4, step = 2} %0 : f32[2]
          return %3, %5, %6, %7, %8
        }
        "#,
    );
}

#[test]
fn canonicalize_removes_only_ieee_exact_arithmetic_identities() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: f32[4]) -> (f32[4], f32[4], f32[4], f32[4], f32[4], f32[4], f32[4]) {
          %1 = full {value = 1.0, dtype = f32, shape = []} : f32[]
          %2 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %3 = full {value = -0.0, dtype = f32, shape = []} : f32[]
          %4 = mul %0, %1 : f32[4]
          %5 = div %0, %1 : f32[4]
          %6 = add %0, %3 : f32[4]
          %7 = sub %0, %2 : f32[4]
          // Not identities: -0.0 + 0.0 and -0.0 - (-0.0) are +0.0.
          %8 = add %0, %2 : f32[4]
          %9 = sub %0, %3 : f32[4]
          %10 = mul %1, %0 : f32[4]
          return %4, %5, %6, %7, %8, %9, %10
        }
        "#,
        r#"
        func @f(%0: f32[4]) -> (f32[4], f32[4], f32[4], f32[4], f32[4], f32[4], f32[4]) {
          %1 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %2 = full {value = -0.0, dtype = f32, shape = []} : f32[]
          %3 = add %0, %1 : f32[4]
          %4 = sub %0, %2 : f32[4]
          return %0, %0, %0, %0, %3, %4, %0
        }
        "#,
    );
}

#[test]
fn canonicalize_removes_integer_and_bool_identities() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: i32[4], %1: bool[4]) -> (i32[4], i32[4], i32[4], i32[4], bool[4], bool[4]) {
          %2 = full {value = 0.0, dtype = i32, shape = []} : i32[]
          %3 = full {value = 1.0, dtype = i32, shape = [4]} : i32[4]
          %4 = add %2, %0 : i32[4]
          %5 = sub %0, %2 : i32[4]
          %6 = mul %0, %3 : i32[4]
          %7 = div %0, %3 : i32[4]
          %8 = full {value = 1.0, dtype = bool, shape = []} : bool[]
          %9 = and %1, %8 : bool[4]
          %10 = full {value = 0.0, dtype = bool, shape = []} : bool[]
          %11 = or %10, %1 : bool[4]
          return %4, %5, %6, %7, %9, %11
        }
        "#,
        r#"
        func @f(%0: i32[4], %1: bool[4]) -> (i32[4], i32[4], i32[4], i32[4], bool[4], bool[4]) {
          return %0, %0, %0, %0, %1, %1
        }
        "#,
    );
}

#[test]
fn canonicalize_moves_constants_of_commutative_ops_to_the_right() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: f32[4], %1: i32[4]) -> (f32[4], f32[4], bool[4], i32[4], f32[4], f32[4]) {
          %2 = full {value = 2.0, dtype = f32, shape = []} : f32[]
          %3 = add %2, %0 : f32[4]
          %4 = mul %2, %0 : f32[4]
          %5 = eq %2, %0 : bool[4]
          %6 = full {value = 3.0, dtype = i32, shape = []} : i32[]
          %7 = max %6, %1 : i32[4]
          // Float max may pick either zero of max(+0.0, -0.0) by order; sub does not commute.
          %8 = max %2, %0 : f32[4]
          %9 = sub %2, %0 : f32[4]
          return %3, %4, %5, %7, %8, %9
        }
        "#,
        r#"
        func @f(%0: f32[4], %1: i32[4]) -> (f32[4], f32[4], bool[4], i32[4], f32[4], f32[4]) {
          %2 = full {value = 2.0, dtype = f32, shape = []} : f32[]
          %3 = add %0, %2 : f32[4]
          %4 = mul %0, %2 : f32[4]
          %5 = eq %0, %2 : bool[4]
          %6 = full {value = 3.0, dtype = i32, shape = []} : i32[]
          %7 = max %1, %6 : i32[4]
          %8 = max %2, %0 : f32[4]
          %9 = sub %2, %0 : f32[4]
          return %3, %4, %5, %7, %8, %9
        }
        "#,
    );
}

#[test]
fn canonicalize_merges_reshape_permute_and_broadcast_chains() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: f32[S, 2, 3]) -> (f32[S, 6], f32[3, S, 2], f32[S, 2, 3], f32[4, 5, 3]) {
          %1 = reshape {shape = [S, 3, 2]} %0 : f32[S, 3, 2]
          %2 = reshape {shape = [S, 6]} %1 : f32[S, 6]
          %3 = permute {perm = [1, 0, 2]} %0 : f32[2, S, 3]
          %4 = permute {perm = [2, 1, 0]} %3 : f32[3, S, 2]
          %5 = permute {perm = [0, 2, 1]} %0 : f32[S, 3, 2]
          %6 = permute {perm = [0, 2, 1]} %5 : f32[S, 2, 3]
          %7 = full {value = 1.0, dtype = f32, shape = [3]} : f32[3]
          %8 = broadcast_to {shape = [5, 3]} %7 : f32[5, 3]
          %9 = broadcast_to {shape = [4, 5, 3]} %8 : f32[4, 5, 3]
          return %2, %4, %6, %9
        }
        "#,
        r#"
        func @f(%0: f32[S, 2, 3]) -> (f32[S, 6], f32[3, S, 2], f32[S, 2, 3], f32[4, 5, 3]) {
          %1 = reshape {shape = [S, 6]} %0 : f32[S, 6]
          %2 = permute {perm = [2, 0, 1]} %0 : f32[3, S, 2]
          %3 = full {value = 1.0, dtype = f32, shape = [3]} : f32[3]
          %4 = broadcast_to {shape = [4, 5, 3]} %3 : f32[4, 5, 3]
          return %1, %2, %0, %4
        }
        "#,
    );
}

#[test]
fn canonicalize_merges_only_exact_cast_chains() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: bf16[4], %1: f32[4], %2: i8[4], %3: i32[4]) -> (f16[4], f32[4], i8[4], i32[4], f32[4]) {
          %4 = cast {to = f32} %0 : f32[4]
          %5 = cast {to = f16} %4 : f16[4]
          // f32 -> bf16 rounds: the chain is not the identity.
          %6 = cast {to = bf16} %1 : bf16[4]
          %7 = cast {to = f32} %6 : f32[4]
          %8 = cast {to = i32} %2 : i32[4]
          %9 = cast {to = i8} %8 : i8[4]
          // i32 -> f32 rounds large integers.
          %10 = cast {to = f32} %3 : f32[4]
          %11 = cast {to = i32} %10 : i32[4]
          %12 = cast {to = f16} %2 : f16[4]
          %13 = cast {to = f32} %12 : f32[4]
          return %5, %7, %9, %11, %13
        }
        "#,
        r#"
        func @f(%0: bf16[4], %1: f32[4], %2: i8[4], %3: i32[4]) -> (f16[4], f32[4], i8[4], i32[4], f32[4]) {
          %4 = cast {to = f16} %0 : f16[4]
          %5 = cast {to = bf16} %1 : bf16[4]
          %6 = cast {to = f32} %5 : f32[4]
          %7 = cast {to = f32} %3 : f32[4]
          %8 = cast {to = i32} %7 : i32[4]
          %9 = cast {to = f32} %2 : f32[4]
          return %4, %6, %2, %8, %9
        }
        "#,
    );
}

#[test]
fn canonicalize_removes_double_negation_and_trivial_selects() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: f32[4], %1: bool[4], %2: f32[4]) -> (f32[4], bool[4], f32[4], f32[4], f32[4]) {
          %3 = neg %0 : f32[4]
          %4 = neg %3 : f32[4]
          %5 = not %1 : bool[4]
          %6 = not %5 : bool[4]
          %7 = select %1, %0, %0 : f32[4]
          %8 = full {value = 1.0, dtype = bool, shape = []} : bool[]
          %9 = select %8, %0, %2 : f32[4]
          %10 = full {value = 0.0, dtype = bool, shape = [4]} : bool[4]
          %11 = select %10, %0, %2 : f32[4]
          return %4, %6, %7, %9, %11
        }
        "#,
        r#"
        func @f(%0: f32[4], %1: bool[4], %2: f32[4]) -> (f32[4], bool[4], f32[4], f32[4], f32[4]) {
          return %0, %1, %0, %0, %2
        }
        "#,
    );
}

#[test]
fn canonicalize_rewrites_inside_loop_bodies() {
    check(
        &["canonicalize", "dce"],
        r#"
        func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
          %2 = full {value = 1.0, dtype = f32, shape = []} : f32[]
          %7 = loop %0, %1 : f32[4] {
          ^(%3: i64[], %4: f32[4]):
            %5 = mul %2, %4 : f32[4]
            %6 = add %5, %4 : f32[4]
            yield %6
          }
          return %7
        }
        "#,
        r#"
        func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
          %5 = loop %0, %1 : f32[4] {
          ^(%2: i64[], %3: f32[4]):
            %4 = add %3, %3 : f32[4]
            yield %4
          }
          return %5
        }
        "#,
    );
}

// ---------------------------------------------------------------------------------------
// constfold
// ---------------------------------------------------------------------------------------

#[test]
fn constfold_folds_scalar_arithmetic_on_fulls() {
    check(
        &["constfold", "dce"],
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 4]) {
          %1 = full {value = 1.0, dtype = f32, shape = []} : f32[]
          %2 = full {value = 16.0, dtype = f32, shape = []} : f32[]
          %3 = sqrt %2 : f32[]
          %4 = div %1, %3 : f32[]
          %5 = mul %0, %4 : f32[S, 4]
          return %5
        }
        "#,
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 4]) {
          %1 = full {value = 0.25, dtype = f32, shape = []} : f32[]
          %2 = mul %0, %1 : f32[S, 4]
          return %2
        }
        "#,
    );
}

#[test]
fn constfold_folds_fulls_of_symbolic_shapes() {
    check(
        &["constfold", "dce"],
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 4], f32[S], f32[4, S], f32[S, 1], f32[2, 4, 8], i64[S]) {
          %1 = full {value = 2.0, dtype = f32, shape = [S, 4]} : f32[S, 4]
          %2 = full {value = 3.0, dtype = f32, shape = [4]} : f32[4]
          %3 = mul %1, %2 : f32[S, 4]
          %4 = reduce_sum {axes = [1], keep = false} %3 : f32[S]
          %5 = permute {perm = [1, 0]} %3 : f32[4, S]
          %6 = reduce_mean {axes = [1], keep = true} %1 : f32[S, 1]
          %7 = full {value = 0.5, dtype = f32, shape = [2, 4, 3]} : f32[2, 4, 3]
          %8 = full {value = 0.25, dtype = f32, shape = [3, 8]} : f32[3, 8]
          %9 = matmul %7, %8 : f32[2, 4, 8]
          %10 = argmax {axis = 1, keep = false} %1 : i64[S]
          %11 = add %0, %3 : f32[S, 4]
          return %11, %4, %5, %6, %9, %10
        }
        "#,
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 4], f32[S], f32[4, S], f32[S, 1], f32[2, 4, 8], i64[S]) {
          %1 = full {value = 6.0, dtype = f32, shape = [S, 4]} : f32[S, 4]
          %2 = full {value = 24.0, dtype = f32, shape = [S]} : f32[S]
          %3 = full {value = 6.0, dtype = f32, shape = [4, S]} : f32[4, S]
          %4 = full {value = 2.0, dtype = f32, shape = [S, 1]} : f32[S, 1]
          %5 = full {value = 0.375, dtype = f32, shape = [2, 4, 8]} : f32[2, 4, 8]
          %6 = full {value = 0.0, dtype = i64, shape = [S]} : i64[S]
          %7 = add %0, %1 : f32[S, 4]
          return %7, %2, %3, %4, %5, %6
        }
        "#,
    );
}

#[test]
fn constfold_leaves_reductions_over_symbolic_dims() {
    check_unchanged(
        &["constfold", "dce"],
        r#"
        func @f(%0: f32[S]) -> (f32[], i64[]) {
          %1 = full {value = 1.0, dtype = f32, shape = [S]} : f32[S]
          %2 = reduce_sum {axes = [0], keep = false} %1 : f32[]
          %3 = full {value = 1.0, dtype = i64, shape = [S]} : i64[S]
          %4 = reduce_sum {axes = [0], keep = false} %3 : i64[]
          return %2, %4
        }
        "#,
    );
}

#[test]
fn constfold_rounds_like_the_interpreter() {
    check(
        &["constfold", "dce"],
        r#"
        func @f() -> (bf16[], bf16[], f16[], f32[], i8[], i32[]) {
          %0 = full {value = 1.0, dtype = bf16, shape = []} : bf16[]
          %1 = full {value = 0.001, dtype = bf16, shape = []} : bf16[]
          %2 = add %0, %1 : bf16[]
          %3 = full {value = 0.1, dtype = f32, shape = []} : f32[]
          %4 = cast {to = bf16} %3 : bf16[]
          %5 = full {value = 70000.0, dtype = f32, shape = []} : f32[]
          %6 = cast {to = f16} %5 : f16[]
          %7 = full {value = 3.0, dtype = f32, shape = []} : f32[]
          %8 = exp %7 : f32[]
          %9 = full {value = 100.0, dtype = i8, shape = []} : i8[]
          %10 = add %9, %9 : i8[]
          %11 = full {value = -7.0, dtype = i32, shape = []} : i32[]
          %12 = full {value = 2.0, dtype = i32, shape = []} : i32[]
          %13 = div %11, %12 : i32[]
          return %2, %4, %6, %8, %10, %13
        }
        "#,
        r#"
        func @f() -> (bf16[], bf16[], f16[], f32[], i8[], i32[]) {
          %0 = full {value = 1.0, dtype = bf16, shape = []} : bf16[]
          %1 = full {value = 0.10009765625, dtype = bf16, shape = []} : bf16[]
          %2 = full {value = inf, dtype = f16, shape = []} : f16[]
          %3 = full {value = 20.08553695678711, dtype = f32, shape = []} : f32[]
          %4 = full {value = -56.0, dtype = i8, shape = []} : i8[]
          %5 = full {value = -4.0, dtype = i32, shape = []} : i32[]
          return %0, %1, %2, %3, %4, %5
        }
        "#,
    );
}

#[test]
fn constfold_folds_arange_results_that_are_uniform() {
    check(
        &["constfold", "dce"],
        r#"
        func @f(%0: f32[4]) -> (f32[4], i64[], f32[4], bool[4]) {
          %1 = arange {len = 4, dtype = f32} : f32[4]
          %2 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %3 = mul %1, %2 : f32[4]
          %4 = arange {len = 4, dtype = i64} : i64[4]
          %5 = reduce_sum {axes = [0], keep = false} %4 : i64[]
          %6 = full {value = 2.0, dtype = f32, shape = []} : f32[]
          %7 = mul %1, %6 : f32[4]
          %8 = full {value = 10.0, dtype = f32, shape = []} : f32[]
          %9 = lt %7, %8 : bool[4]
          %10 = add %0, %3 : f32[4]
          return %10, %5, %7, %9
        }
        "#,
        r#"
        func @f(%0: f32[4]) -> (f32[4], i64[], f32[4], bool[4]) {
          %1 = arange {len = 4, dtype = f32} : f32[4]
          %2 = full {value = 0.0, dtype = f32, shape = [4]} : f32[4]
          %3 = full {value = 6.0, dtype = i64, shape = []} : i64[]
          %4 = full {value = 2.0, dtype = f32, shape = []} : f32[]
          %5 = mul %1, %4 : f32[4]
          %6 = full {value = 1.0, dtype = bool, shape = [4]} : bool[4]
          %7 = add %0, %2 : f32[4]
          return %7, %3, %5, %6
        }
        "#,
    );
}

#[test]
fn constfold_leaves_what_fails_or_cannot_be_written_as_full() {
    check(
        &["constfold", "dce"],
        r#"
        func @f() -> (i32[], f32[], i64[], f32[2, 1]) {
          %0 = full {value = 1.0, dtype = i32, shape = []} : i32[]
          %1 = full {value = 0.0, dtype = i32, shape = []} : i32[]
          // Fails at run time: stays so.
          %2 = div %0, %1 : i32[]
          // NaN's bits depend on the machine.
          %3 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %4 = div %3, %3 : f32[]
          // 9223372030926249001 is not an f64.
          %5 = full {value = 3037000499.0, dtype = i64, shape = []} : i64[]
          %6 = mul %5, %5 : i64[]
          // Moving a NaN constant computes nothing: it folds.
          %7 = full {value = nan, dtype = f32, shape = [2]} : f32[2]
          %8 = reshape {shape = [2, 1]} %7 : f32[2, 1]
          return %2, %4, %6, %8
        }
        "#,
        r#"
        func @f() -> (i32[], f32[], i64[], f32[2, 1]) {
          %0 = full {value = 1.0, dtype = i32, shape = []} : i32[]
          %1 = full {value = 0.0, dtype = i32, shape = []} : i32[]
          %2 = div %0, %1 : i32[]
          %3 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %4 = div %3, %3 : f32[]
          %5 = full {value = 3037000499.0, dtype = i64, shape = []} : i64[]
          %6 = mul %5, %5 : i64[]
          %7 = full {value = nan, dtype = f32, shape = [2, 1]} : f32[2, 1]
          return %2, %4, %6, %7
        }
        "#,
    );
}

#[test]
fn constfold_moves_fulls_through_layout_ops() {
    check(
        &["constfold", "dce"],
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 2, 2], f32[3, S, 4], f32[S, 2], f32[S, 8], f32[S, 8], f32[2, 4], f32[3, 2]) {
          %1 = full {value = 1.5, dtype = f32, shape = [S, 4]} : f32[S, 4]
          %2 = reshape {shape = [S, 2, 2]} %1 : f32[S, 2, 2]
          %3 = broadcast_to {shape = [3, S, 4]} %1 : f32[3, S, 4]
          %4 = slice {axis = 1, start = 1, end = 4, step = 2} %1 : f32[S, 2]
          %5 = concat {axis = 1} %1, %1 : f32[S, 8]
          // Not uniform.
          %6 = full {value = 2.5, dtype = f32, shape = [S, 4]} : f32[S, 4]
          %7 = concat {axis = 1} %1, %6 : f32[S, 8]
          // A constant end on a symbolic dim is checked at run time (S >= 2).
          %8 = slice {axis = 0, start = 0, end = 2, step = 1} %1 : f32[2, 4]
          %9 = full {value = 7.0, dtype = f32, shape = [5, 2]} : f32[5, 2]
          %10 = arange {len = 3, dtype = i32} : i32[3]
          %11 = gather {axis = 0} %9, %10 : f32[3, 2]
          return %2, %3, %4, %5, %7, %8, %11
        }
        "#,
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 2, 2], f32[3, S, 4], f32[S, 2], f32[S, 8], f32[S, 8], f32[2, 4], f32[3, 2]) {
          %1 = full {value = 1.5, dtype = f32, shape = [S, 4]} : f32[S, 4]
          %2 = full {value = 1.5, dtype = f32, shape = [S, 2, 2]} : f32[S, 2, 2]
          %3 = full {value = 1.5, dtype = f32, shape = [3, S, 4]} : f32[3, S, 4]
          %4 = full {value = 1.5, dtype = f32, shape = [S, 2]} : f32[S, 2]
          %5 = full {value = 1.5, dtype = f32, shape = [S, 8]} : f32[S, 8]
          %6 = full {value = 2.5, dtype = f32, shape = [S, 4]} : f32[S, 4]
          %7 = concat {axis = 1} %1, %6 : f32[S, 8]
          %8 = slice {axis = 0, start = 0, end = 2, step = 1} %1 : f32[2, 4]
          %9 = full {value = 7.0, dtype = f32, shape = [3, 2]} : f32[3, 2]
          return %2, %3, %4, %5, %7, %8, %9
        }
        "#,
    );
}

#[test]
fn constfold_folds_inside_loop_bodies_with_outer_constants() {
    check(
        &["constfold", "dce"],
        r#"
        func @f(%0: i64[], %1: f32[G, M]) -> (f32[G, M]) {
          %2 = full {value = 4.0, dtype = f32, shape = []} : f32[]
          %7 = loop %0, %1 : f32[G, M] {
          ^(%3: i64[], %4: f32[G, M]):
            %5 = rsqrt %2 : f32[]
            %6 = mul %4, %5 : f32[G, M]
            yield %6
          }
          return %7
        }
        "#,
        r#"
        func @f(%0: i64[], %1: f32[G, M]) -> (f32[G, M]) {
          %6 = loop %0, %1 : f32[G, M] {
          ^(%2: i64[], %3: f32[G, M]):
            %4 = full {value = 0.5, dtype = f32, shape = []} : f32[]
            %5 = mul %3, %4 : f32[G, M]
            yield %5
          }
          return %6
        }
        "#,
    );
}

// ---------------------------------------------------------------------------------------
// cse
// ---------------------------------------------------------------------------------------

#[test]
fn cse_merges_repeated_instructions_and_params() {
    check(
        &["cse", "dce"],
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 4], f32[S, 4], f32[S, 4], f32[4], f32[4]) {
          %1 = param {name = "w", ty = f32[4]} : f32[4]
          %2 = param {name = "w", ty = f32[4]} : f32[4]
          %3 = param {name = "v", ty = f32[4]} : f32[4]
          %4 = mul %0, %1 : f32[S, 4]
          %5 = mul %0, %2 : f32[S, 4]
          %6 = mul %1, %0 : f32[S, 4]
          %7 = add %4, %5 : f32[S, 4]
          %8 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %9 = full {value = -0.0, dtype = f32, shape = []} : f32[]
          %10 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %11 = add %3, %8 : f32[4]
          %12 = add %3, %9 : f32[4]
          %13 = add %3, %10 : f32[4]
          return %7, %6, %4, %12, %13
        }
        "#,
        r#"
        func @f(%0: f32[S, 4]) -> (f32[S, 4], f32[S, 4], f32[S, 4], f32[4], f32[4]) {
          %1 = param {name = "w", ty = f32[4]} : f32[4]
          %2 = param {name = "v", ty = f32[4]} : f32[4]
          %3 = mul %0, %1 : f32[S, 4]
          %4 = mul %1, %0 : f32[S, 4]
          %5 = add %3, %3 : f32[S, 4]
          %6 = full {value = 0.0, dtype = f32, shape = []} : f32[]
          %7 = full {value = -0.0, dtype = f32, shape = []} : f32[]
          %8 = add %2, %6 : f32[4]
          %9 = add %2, %7 : f32[4]
          return %5, %4, %3, %9, %8
        }
        "#,
    );
}

#[test]
fn cse_distinguishes_attributes() {
    check(
        &["cse", "dce"],
        r#"
        func @f(%0: f32[2, 3]) -> (f32[3], f32[2], f32[3]) {
          %1 = reduce_sum {axes = [0], keep = false} %0 : f32[3]
          %2 = reduce_sum {axes = [1], keep = false} %0 : f32[2]
          %3 = reduce_max {axes = [0], keep = false} %0 : f32[3]
          %4 = reduce_sum {axes = [0], keep = false} %0 : f32[3]
          %5 = add %1, %4 : f32[3]
          return %5, %2, %3
        }
        "#,
        r#"
        func @f(%0: f32[2, 3]) -> (f32[3], f32[2], f32[3]) {
          %1 = reduce_sum {axes = [0], keep = false} %0 : f32[3]
          %2 = reduce_sum {axes = [1], keep = false} %0 : f32[2]
          %3 = reduce_max {axes = [0], keep = false} %0 : f32[3]
          %4 = add %1, %1 : f32[3]
          return %4, %2, %3
        }
        "#,
    );
}

#[test]
fn cse_respects_region_scopes() {
    check(
        &["cse", "dce"],
        r#"
        func @f(%0: i64[], %1: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %2 = exp %1 : f32[4]
          %8 = loop %0, %1 : f32[4] {
          ^(%3: i64[], %4: f32[4]):
            %5 = exp %1 : f32[4]
            %6 = neg %1 : f32[4]
            %7 = add %5, %6 : f32[4]
            yield %7
          }
          %14 = loop %0, %1 : f32[4] {
          ^(%9: i64[], %10: f32[4]):
            %11 = exp %1 : f32[4]
            %12 = neg %1 : f32[4]
            %13 = add %11, %12 : f32[4]
            yield %13
          }
          %15 = neg %1 : f32[4]
          %16 = add %2, %15 : f32[4]
          return %8, %14, %16
        }
        "#,
        r#"
        func @f(%0: i64[], %1: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %2 = exp %1 : f32[4]
          %7 = loop %0, %1 : f32[4] {
          ^(%3: i64[], %4: f32[4]):
            %5 = neg %1 : f32[4]
            %6 = add %2, %5 : f32[4]
            yield %6
          }
          %12 = loop %0, %1 : f32[4] {
          ^(%8: i64[], %9: f32[4]):
            %10 = neg %1 : f32[4]
            %11 = add %2, %10 : f32[4]
            yield %11
          }
          %13 = neg %1 : f32[4]
          %14 = add %2, %13 : f32[4]
          return %7, %12, %14
        }
        "#,
    );
}

// ---------------------------------------------------------------------------------------
// dce
// ---------------------------------------------------------------------------------------

#[test]
fn dce_removes_unused_instructions_and_renumbers() {
    check(
        &["dce"],
        r#"
        func @f(%0 "x": f32[4], %1 "unused": f32[4]) -> (f32[4]) {
          %2 "dead" = exp %0 : f32[4]
          %3 = neg %2 : f32[4]
          %4 "kept" = sin %0 : f32[4]
          %5 = param {name = "w", ty = f32[4]} : f32[4]
          %6 "y" = mul %4, %0 : f32[4]
          return %6
        }
        "#,
        r#"
        func @f(%0 "x": f32[4], %1 "unused": f32[4]) -> (f32[4]) {
          %2 "kept" = sin %0 : f32[4]
          %3 "y" = mul %2, %0 : f32[4]
          return %3
        }
        "#,
    );
}

#[test]
fn dce_removes_unused_loops_and_dead_code_in_live_loops() {
    check(
        &["dce"],
        r#"
        func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
          %2 = exp %1 : f32[4]
          %7 = loop %0, %1 : f32[4] {
          ^(%3: i64[], %4: f32[4]):
            %5 = sin %4 : f32[4]
            %6 = add %4, %2 : f32[4]
            yield %6
          }
          %12 = loop %0, %1 : f32[4] {
          ^(%8: i64[], %9: f32[4]):
            %10 = cos %9 : f32[4]
            %11 = add %10, %2 : f32[4]
            yield %11
          }
          return %7
        }
        "#,
        r#"
        func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
          %2 = exp %1 : f32[4]
          %6 = loop %0, %1 : f32[4] {
          ^(%3: i64[], %4: f32[4]):
            %5 = add %4, %2 : f32[4]
            yield %5
          }
          return %6
        }
        "#,
    );
}

#[test]
fn dce_leaves_compact_functions_alone() {
    check_unchanged(
        &["dce"],
        r#"
        func @f(%0: f32[4]) -> (f32[4]) {
          %1 = exp %0 : f32[4]
          return %1
        }
        "#,
    );
}

// ---------------------------------------------------------------------------------------
// the test oracle
// ---------------------------------------------------------------------------------------

/// `check`'s differential run sees a wrong rewrite: `x + 0.0` is not `x` for `x = -0.0`,
/// which the generated inputs hold.
#[test]
#[should_panic(expected = "result 0 changed")]
fn the_differential_check_catches_a_wrong_rewrite() {
    let before = parse_module(
        "func @f(%0: f32[4]) -> (f32[4]) {
           %1 = full {value = 0.0, dtype = f32, shape = []} : f32[]
           %2 = add %0, %1 : f32[4]
           return %2
         }",
    )
    .unwrap();
    let after = parse_module("func @f(%0: f32[4]) -> (f32[4]) { return %0 }").unwrap();
    assert_same_results(&before, &after);
}
