// Experiment (branch d96-narrow): D96 in the D128 tiles, products over 96 columns.
#include "../kernels_sm90.cuh"

namespace dilated_sparse::cuda {
DS_REGISTER_DKV_SM90(__nv_bfloat16, 1, 128, 4, 2, 64, kSchedPingPong2 | kDkvEarlyDv | kThreeQuarterScoreK | kHalfOut, 0)
DS_REGISTER_DKV_SM90(__nv_bfloat16, 1, 128, 5, 2, 64, kSchedPingPong2 | kSchedWriteDs | kDkvEarlyDv | kThreeQuarterScoreK | kHalfOut, 8)
// Baseline for the A/B (forced only): the D128 dS-scratch dK/dV itself, as D96 ran before.
DS_SM90_REGISTRAR(kOpDkv, 1, 96, 7, (&launch_dkv_sm90<__nv_bfloat16, 128, 2, 64, kSchedPingPong2 | kSchedWriteDs | kDkvEarlyDv>), 128, 64, 8)
}  // namespace dilated_sparse::cuda
