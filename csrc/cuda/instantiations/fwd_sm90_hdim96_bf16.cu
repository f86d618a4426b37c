// Experiment (branch d96-narrow): D96 in the D128 tiles, products over 96 columns.
#include "../kernels_sm90.cuh"

namespace dilated_sparse::cuda {
DS_REGISTER_FWD_SM90(__nv_bfloat16, 1, 128, 4, 2, 128, kSchedPingPong | kFwdLazyRescale | kFwdQRegs | kThreeQuarterScoreK | kHalfOut, 0)
// Baseline for the A/B (forced only): the D128 default kernel itself, as D96 ran before.
DS_SM90_REGISTRAR(kOpFwd, 1, 96, 6, (&launch_fwd_sm90<__nv_bfloat16, 128, 2, 128, kSchedPingPong | kFwdLazyRescale | kFwdQRegs>), 128, 128,
                  (FwdSm90Cfg<128, 2, 128, kSchedPingPong | kFwdLazyRescale | kFwdQRegs>::kOBytes > 0 ? kFlagTmaOut : 0))
}  // namespace dilated_sparse::cuda
