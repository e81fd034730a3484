// Registers every op's autograd kernel (csrc/autograd/<op>_autograd.h) for the Autograd key.
//
// One translation unit for all of them: the autograd headers cost ~9 s of compile time per file,
// paid once here instead of once per op on a user's first build.

#include "adversarial_autograd.h"
#include "batch_norm_act_autograd.h"
#include "bias_act_autograd.h"
#include "joint_loss_autograd.h"
#include "minibatch_stddev_autograd.h"
#include "pixel_norm_act_autograd.h"
#include "seg_cross_entropy_autograd.h"
#include "upsample_fold_autograd.h"
#include "vae_loss_autograd.h"

namespace mtcore {
namespace autograd {

TORCH_LIBRARY_IMPL(mtcore, Autograd, m) {
  m.impl("adv_loss_fwd", &adversarial::adv_loss_fwd_autograd);
  m.impl("bias_act", &bias_act::bias_act_autograd);
  m.impl("bias_act_grad", &bias_act::bias_act_grad_autograd);
  m.impl("bn_act_fwd", &batch_norm_act::bn_act_fwd_autograd);
  m.impl("joint_loss_fwd", &joint_loss::joint_loss_fwd_autograd);
  m.impl("mbstd_fwd", &minibatch_stddev::mbstd_fwd_autograd);
  m.impl("mbstd_bwd", &minibatch_stddev::mbstd_bwd_autograd);
  m.impl("pn_act_fwd", &pixel_norm_act::pn_act_fwd_autograd);
  m.impl("seg_ce_fwd", &seg_cross_entropy::seg_ce_fwd_autograd);
  m.impl("upsample_fold", &upsample_fold::upsample_fold_autograd);
  m.impl("upsample_fold_backward", &upsample_fold::upsample_fold_backward_autograd);
  m.impl("vae_loss_fwd", &vae_loss::vae_loss_fwd_autograd);
}

}  // namespace autograd
}  // namespace mtcore
