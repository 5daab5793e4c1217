"""The exported-file format shared by ``vdd_ros.learn.export`` (writer) and the runtime (reader).

Pure constants: no numpy, no onnx, no torch. Every exported file is one self-contained ONNX
model (weights, normalisation and spec inside); its ``metadata_props`` hold:

- ``vdd_ros.spec``: the ModelSpec JSON (``model_info`` names the graph role, experts or steps,
  opset, export format version and the training config's hash);
- ``vdd_ros.graph_role``: one of ``GRAPH_ROLES``;
- ``vdd_ros.export_format``: ``EXPORT_FORMAT_VERSION`` as text.
"""
from __future__ import annotations

EXPORT_FORMAT_VERSION = 1
OPSET = 18  # ONNX default domain opset of every exported graph (onnxruntime >= 1.14 runs it)

META_SPEC = "vdd_ros.spec"
META_ROLE = "vdd_ros.graph_role"
META_FORMAT = "vdd_ros.export_format"

ROLE_STUDENT = "student"
ROLE_TEACHER_SAMPLER = "teacher_sampler"
ROLE_TEACHER_DENOISER = "teacher_denoiser"
GRAPH_ROLES = (ROLE_STUDENT, ROLE_TEACHER_SAMPLER, ROLE_TEACHER_DENOISER)

# model kinds (spec.model_kind) each role may hold
ROLE_MODEL_KINDS = {
    ROLE_STUDENT: ("vdd_mixture", "em_mixture"),
    ROLE_TEACHER_SAMPLER: ("diffusion_teacher",),
    ROLE_TEACHER_DENOISER: ("diffusion_teacher",),
}

# Graph inputs and outputs, in order. B is dynamic; T = history, D = obs_step_dim,
# H = action_horizon, J = n_joints, Z = experts. "raw" = the robot's units, "normalised" =
# the spec's normalisation applied.
#   student  in : obs [B,T,D] f32 raw; uniform [B] f32 in [0,1) (inverse CDF of the gating);
#                 noise [B,H,J] f32 standard normal; noise_scale [B] f32 (0: the expert mean);
#                 greedy [B] bool (argmax expert instead of sampling); forced_expert [B] i64
#                 (>= 0 overrides the choice, -1 lets the gating choose)
#            out: actions [B,H,J] f32 raw; expert [B] i64; gating [B,Z] f32;
#                 expert_means [B,Z,H,J] f32 raw
#   sampler  in : obs [B,T,D] f32 raw; noise [B,H,J] f32 standard normal (scaled by sigma_max inside)
#            out: actions [B,H,J] f32 raw
#   denoiser in : x [B,H,J] f32 normalised noisy chunk; obs [B,T,D] f32 raw; sigma [B] f32 > 0
#            out: denoised [B,H,J] f32 normalised
GRAPH_INPUTS = {
    ROLE_STUDENT: ("obs", "uniform", "noise", "noise_scale", "greedy", "forced_expert"),
    ROLE_TEACHER_SAMPLER: ("obs", "noise"),
    ROLE_TEACHER_DENOISER: ("x", "obs", "sigma"),
}
GRAPH_OUTPUTS = {
    ROLE_STUDENT: ("actions", "expert", "gating", "expert_means"),
    ROLE_TEACHER_SAMPLER: ("actions",),
    ROLE_TEACHER_DENOISER: ("denoised",),
}
