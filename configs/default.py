"""The schema: every field score_jax reads, with its default and one comment each.

The embedded default is the two-mode Gaussian mixture of the NCSN paper (Song & Ermon 2019,
Section 3: 1/5 N((-5,-5), I) + 4/5 N((5,5), I)) learned by a noise-conditional MLP over a
geometric ladder sigma 20 -> 0.1 (20 levels: the last level is a tenth of the modes' unit std, so
the final Tweedie step shrinks their variance by 1 %, not by half as it does from sigma 1), then
sampled with ALS (100 steps per level, 2001 NFE), CAS (10 levels per trained interval, 191 NFE)
and EDM's stochastic Heun sampler (50-level rho-schedule with churn, 99 NFE).

    python main.py                                   # this config, workdir runs/default
    python main.py --config=configs/mnist_cpu.py     # an experiment config (overrides this one)

Experiment configs call `get_config()` here and override fields; they never add fields.
Configs are locked: setting an unknown key fails with a message naming it. Unset optional
values are `None` (typed placeholders), never sentinel strings or -1.
"""

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "default"  # run name; the default workdir is runs/<name>.
  config.seed = 0  # root seed of the run; every key is folded from it.

  # --- data -------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "ncsn_mixture"  # toy name (score_jax.toy.DATASETS) or image name (mnist, cifar10, ..., folder, npz).
  data.toy_dim = 2  # dimension of toy Gaussian data sets (gaussian, point_mass); 2-D toys ignore it.
  data.image_size = 32  # image side in pixels after preprocessing (images only).
  data.num_channels = 3  # channels of the images (1 for MNIST); toys: ignored.
  data.data_dir = placeholder(str)  # TFDS data dir with prepared datasets; None = TFDS default (~/tensorflow_datasets).
  data.manual_dir = placeholder(str)  # folder with a dataset's original files for offline preparation (TFDS manual_dir).
  data.path = placeholder(str)  # folder of PNG/JPEG images or an .npz file (dataset 'folder' / 'npz').
  data.split = "train"  # split to train on.
  data.eval_split = "test"  # split for the test loss and reference statistics.
  data.random_flip = False  # random horizontal flips (images).
  data.uniform_dequantization = False  # add U[0,1)/256 noise to 8-bit pixels (NCSN v1 convention x*255/256 + u/256).
  data.gaussian_dequantization = False  # add N(0, 0.01^2) noise (NCSNv2 option).
  data.centered = False  # True: data in [-1, 1]; False: [0, 1] (the NCSN/NCSNv2 convention; nets map 2x-1 inside).
  data.num_workers = 0  # grain worker processes; 0 reads in the main process.
  data.prefetch = 2  # batches prepared ahead of the training step.

  # --- model ------------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.name = "mlp"  # mlp | ncsn | ncsnv2 | ncsnv2_deeper | ncsnv2_deepest | unet.
  model.dtype = "float32"  # image nets: compute dtype float32 | bfloat16 (params and loss stay float32).
  model.remat = False  # image nets: rematerialize residual blocks to save memory (large variants).
  model.preconditioning = "ncsn"  # ncsn: the net takes (x, sigma) | edm: EDM's F(c_in x; c_noise), D = c_skip x + c_out F (Karras et al. 2022).
  # One sub-group per network module, holding the hyperparameters that module takes;
  # score_jax.models.build reads only the sub-group of model.name. A new network adds its own.
  model.mlp = mlp = ml_collections.ConfigDict()  # mlp (models.mlp.NoiseConditionalMLP).
  mlp.hidden = 128  # width of each hidden layer.
  mlp.num_layers = 3  # number of hidden layers.
  mlp.activation = "softplus"  # softplus | elu | swish | relu.
  model.ncsn = ncsn = ml_collections.ConfigDict()  # ncsn, ncsnv2, ncsnv2_deeper, ncsnv2_deepest (models.ncsn).
  ncsn.ngf = 128  # base number of feature maps (64 for MNIST NCSN).
  ncsn.nonlinearity = "elu"  # elu | relu | lrelu | swish.
  ncsn.noise_embedding = False  # NCSNv2 family with model.preconditioning=edm: embed c_noise into the encoder blocks; False: unconditional F.
  model.unet = unet = ml_collections.ConfigDict()  # unet (models.unet.UNet).
  unet.ch = 128  # base number of channels.
  unet.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution.
  unet.num_res_blocks = 2  # residual blocks per resolution (down path; up path has one more).
  unet.attn_resolutions = (16,)  # resolutions (pixels) with self-attention.
  unet.dropout = 0.0  # dropout rate.
  unet.conditional = False  # whether the net receives the noise level.
  unet.input_range = "centered"  # what the first conv sees: centered ([-1, 1], DDPM) | unit ([0, 1], the AC UNet: no rescaling of its [0, 1] data).

  # --- noise ------------------------------------------------------------------------------------
  config.noise = noise = ml_collections.ConfigDict()
  noise.schedule = "geometric"  # geometric | linear spacing of the ladder.
  noise.sigma_max = 20.0  # sigma_1, largest noise std (data units).
  noise.sigma_min = 0.1  # sigma_L, smallest noise std (data units).
  noise.num_scales = 20  # L, number of noise levels.
  noise.level_sampling = "uniform"  # uniform | stratified | antithetic draw of each example's level.
  noise.weight_power = 2.0  # lambda(sigma) = sigma^power; 2 is the DSM convention of NCSN.
  noise.distribution = "ladder"  # training sigma: ladder (a level per example) | log_uniform on [sigma_min, sigma_max] (score_sde VE) | log_normal (EDM); continuous runs use the ladder for ALS/CAS and metric bins.
  noise.p_mean = -1.2  # log_normal: mean of ln sigma (EDM P_mean).
  noise.p_std = 1.2  # log_normal: std of ln sigma (EDM P_std).
  noise.weighting = "ncsn"  # loss weighting: ncsn (sigma^weight_power) | edm ((sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on ||D - x||^2).
  noise.sigma_data = 0.5  # std of the data (data units): EDM's weighting and preconditioning.

  # --- optim ------------------------------------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "adam"  # adam | adamw.
  optim.lr = 1e-3  # peak learning rate.
  optim.beta1 = 0.9  # Adam beta1 (may be negative for the adversarial discriminator's Adamp).
  optim.beta2 = 0.999  # Adam beta2.
  optim.eps = 1e-8  # Adam epsilon.
  optim.weight_decay = 0.0  # decoupled weight decay (adamw only).
  optim.warmup_steps = 0  # linear warm-up steps; 0 disables.
  optim.grad_clip = placeholder(float)  # clip gradients to this global norm; None disables.

  # --- training ---------------------------------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.loss = "dsm"  # dsm | ssm (sliced score matching).
  training.ssm_projection = "gaussian"  # ssm: gaussian | rademacher projections.
  training.ssm_num_projections = 1  # ssm: projections per example.
  training.batch_size = 512  # global batch size (all devices, all hosts).
  training.num_train_steps = 6000  # total optimizer steps.
  training.steps_per_dispatch = 1  # optimizer steps fused into one compiled call (lax.scan).
  training.log_every_steps = 250  # metrics averaging/logging interval (steps).
  training.eval_every_steps = 1000  # test-loss interval (steps); None disables.
  training.ckpt_every_steps = 1000  # checkpoint interval (steps).
  training.keep_checkpoints = 3  # keep the last N checkpoints...
  training.keep_every_steps = placeholder(int)  # ...plus every checkpoint at a multiple of K steps; None: none.
  training.ema_decays = (0.999,)  # EMA rates kept in the state; sampling uses ema_decays[0].
  training.distributed = False  # call jax.distributed.initialize() (multi-host).
  training.async_checkpoint = True  # save checkpoints asynchronously.
  training.progress_bar = True  # live progress bar on the terminal.

  # --- sampling ---------------------------------------------------------------------------------
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "als"  # sampler of --mode=sample/eval, inpainting and make_sampler: als | cas | pc | euler | heun | dpm_solver_pp_2m | adaptive.
  sampling.methods = ("als", "cas", "heun")  # samplers the train job runs after training, in this order.
  sampling.denoise = True  # final denoising step x + sigma_L^2 s(x, sigma_L).
  sampling.use_ema = True  # sample (and evaluate) with the EMA weights ema_decays[0]; False: the raw weights (NCSN v1).
  sampling.init = "gaussian"  # ALS/CAS start: uniform: U[0,1] (NCSN images) | gaussian: N(0, sigma_max^2) (toys); the other samplers start from the VE prior.
  sampling.num_samples = 2000  # samples written per sampling run.
  sampling.batch_size = 2000  # samples per compiled call.
  sampling.save_every_levels = placeholder(int)  # keep intermediate samples every k levels; None keeps none.
  sampling.inpaint_examples = 8  # images: test images whose right half is inpainted after sampling; 0: none.
  # One sub-group per sampler, holding exactly the keyword arguments of its function in
  # score_jax.samplers; a new sampler adds its own sub-group here.
  sampling.als = als = ml_collections.ConfigDict()  # annealed Langevin (samplers.annealed_langevin).
  als.step_lr = 0.0005  # epsilon, reference-code convention: alpha_i = step_lr (sigma_i/sigma_L)^2.
  als.steps_per_sigma = 100  # Langevin steps per level.
  sampling.cas = cas = ml_collections.ConfigDict()  # consistent annealed (samplers.consistent_annealed).
  cas.step_lr = 0.00055  # epsilon; must lie in the CAS feasibility interval sigma_L^2 (1 -+ gamma).
  cas.n_sigma = 10  # levels per trained interval (>1 samples a finer geometric ladder).
  cas.eta = placeholder(tuple)  # instead of step_lr (set it None): eta per level of the sampling ladder, or one value.
  sampling.pc = pc = ml_collections.ConfigDict()  # predictor-corrector (samplers.predictor_corrector).
  pc.snr = 0.16  # corrector signal-to-noise ratio.
  pc.corrector_steps = 100  # Langevin corrector steps per level.
  sampling.euler = euler = ml_collections.ConfigDict()  # PF-ODE Euler (samplers.euler), NFE = N.
  euler.ladder = "karras"  # trained | geometric | karras (EDM rho-schedule): the levels stepped through, then 0.
  euler.num_steps = config_dict.FieldReference(50, field_type=int)  # N, levels of a geometric/karras ladder; None for trained.
  euler.rho = 7.0  # karras: the schedule's exponent (EDM: 7).
  euler.sigma_max = placeholder(float)  # geometric/karras: first level (and prior std); None: noise.sigma_max.
  euler.sigma_min = placeholder(float)  # geometric/karras: last level before 0; None: noise.sigma_min.
  euler.s_churn = 0.0  # EDM S_churn: stochasticity, gamma = min(S_churn / N, sqrt(2) - 1); 0: deterministic.
  euler.s_tmin = 0.0  # churn only at levels in [s_tmin, s_tmax].
  euler.s_tmax = placeholder(float)  # see s_tmin; None: no upper bound.
  euler.s_noise = 1.0  # EDM S_noise: std factor of the churn noise.
  sampling.heun = heun = ml_collections.ConfigDict()  # EDM Algorithm 2 (samplers.heun), NFE = 2N - 1.
  heun.ladder = "karras"  # trained | geometric | karras (EDM rho-schedule): the levels stepped through, then 0.
  heun.num_steps = config_dict.FieldReference(50, field_type=int)  # N, levels of a geometric/karras ladder; None for trained.
  heun.rho = 7.0  # karras: the schedule's exponent (EDM: 7).
  heun.sigma_max = placeholder(float)  # geometric/karras: first level (and prior std); None: noise.sigma_max.
  heun.sigma_min = placeholder(float)  # geometric/karras: last level before 0; None: noise.sigma_min.
  heun.s_churn = 10.0  # EDM S_churn: stochasticity, gamma = min(S_churn / N, sqrt(2) - 1); 0: deterministic.
  heun.s_tmin = 0.0  # churn only at levels in [s_tmin, s_tmax].
  heun.s_tmax = placeholder(float)  # see s_tmin; None: no upper bound.
  heun.s_noise = 1.0  # EDM S_noise: std factor of the churn noise.
  sampling.dpm_solver_pp_2m = dpm = ml_collections.ConfigDict()  # DPM-Solver++(2M), NFE = N.
  dpm.ladder = "karras"  # trained | geometric | karras (EDM rho-schedule): the levels stepped through, then 0.
  dpm.num_steps = config_dict.FieldReference(25, field_type=int)  # N, levels of a geometric/karras ladder; None for trained.
  dpm.rho = 7.0  # karras: the schedule's exponent (EDM: 7).
  dpm.sigma_max = placeholder(float)  # geometric/karras: first level (and prior std); None: noise.sigma_max.
  dpm.sigma_min = placeholder(float)  # geometric/karras: last level before 0; None: noise.sigma_min.
  sampling.adaptive = adaptive = ml_collections.ConfigDict()  # Gotta Go Fast (samplers.adaptive).
  adaptive.sigma_max = placeholder(float)  # first noise level (and prior std); None: noise.sigma_max.
  adaptive.sigma_min = placeholder(float)  # last noise level; None: noise.sigma_min.
  adaptive.abs_tol = 0.0039  # absolute tolerance (one 8-bit level of data in [0, 1]).
  adaptive.rel_tol = 0.05  # relative tolerance (paper: 0.01 to 0.1).
  adaptive.h_init = 0.01  # first step in t in [0, 1].
  adaptive.safety = 0.9  # step-size controller safety factor.
  adaptive.exponent = 0.9  # step-size controller exponent.
  adaptive.h_max_factor = placeholder(float)  # cap on the step's growth per attempt; None: none (the paper).
  adaptive.max_iters = 10_000  # bound on solver iterations.
  adaptive.denoise = True  # final Tweedie denoising at sigma_min (one more evaluation).
  adaptive.noise = "brownian_tree"  # brownian_tree (path fixed across rejections) | redraw (the paper's fresh draw: biased in low dimension).

  # --- adversarial (Jolicoeur-Martineau et al. 2020) -----------------------------------------------
  config.adversarial = adversarial = ml_collections.ConfigDict()
  adversarial.enabled = False  # train with a discriminator on denoised samples.
  adversarial.gan_loss = "lsgan"  # lsgan | lsgan_sat | gan | wgan | hinge | rpgan | rplsgan | ragan | ralsgan | rahinge.
  adversarial.lambda_dsm = 1.0  # weight of the DSM term in the score network's loss.
  adversarial.lambda_g = 1.0  # weight of the generator loss in the score network's loss.
  adversarial.lambda_d = 1.0  # weight of the discriminator loss.
  adversarial.d_steps = 1  # D updates per score-network update, each on its own data batch.
  adversarial.d_arch = "biggan"  # biggan | dcgan | mlp (toys).
  adversarial.d_ch = 64  # discriminator base width.
  adversarial.d_lr = 1e-4  # discriminator Adam learning rate.
  adversarial.d_beta1 = -0.5  # discriminator Adam beta1 (Adamp allows [-1, 1)).
  adversarial.d_beta2 = 0.9  # discriminator Adam beta2.
  adversarial.clamp = True  # clamp denoised samples to the data range before D sees them.

  # --- eval -------------------------------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 1000  # samples per evaluated checkpoint.
  ev.batch_size = 500  # samples/images per compiled evaluation call.
  ev.begin_step = placeholder(int)  # first checkpoint step to evaluate; None: the earliest.
  ev.end_step = placeholder(int)  # last checkpoint step to evaluate; None: the latest.
  ev.features = "auto"  # auto | inception | mnist_classifier | toy: the feature space of FID/KID.
  ev.inception_weights = placeholder(str)  # .npz of converted Inception weights; None: the cache dir.
  ev.mnist_classifier_weights = placeholder(str)  # .npz of the MNIST classifier (features=mnist_classifier); None: the cache dir (python -m score_jax.eval.mnist_classifier writes it).
  ev.reference_stats = placeholder(str)  # .npz of reference statistics; None: computed and cached.
  ev.reference_split = placeholder(str)  # split of computed reference statistics; None: data.eval_split.
  ev.reference_num_images = placeholder(int)  # first N images of that split; None: eval.num_samples.
  ev.sweep_step_lrs = (0.05, 0.1, 0.2)  # sampler_sweep: step_lr grid.
  ev.sweep_steps_per_sigma = (100,)  # sampler_sweep: grid of ALS steps and PC corrector steps per level.
  ev.sweep_methods = ("als", "cas")  # sampler_sweep: sampler kinds (any of sampling.method's).
  ev.sweep_num_steps = (10, 25, 50)  # sampler_sweep: ladder lengths N of euler, heun, dpm_solver_pp_2m.
  ev.sweep_rel_tols = (0.05, 0.1)  # sampler_sweep: rel_tol grid of the adaptive solver.
  ev.sweep_denoise = (False, True)  # sampler_sweep: with/without the final denoising step.
  ev.sweep_vmap = True  # sampler_sweep: settings differing only in step_lr run as one vmapped program.

  # --- likelihood (--mode=likelihood: probability-flow ODE, score_jax.likelihood) ----------------
  config.likelihood = lik = ml_collections.ConfigDict()
  lik.trace = "auto"  # divergence: exact | rademacher | gaussian | auto (exact for toys, rademacher for images).
  lik.num_probes = 1  # Hutchinson probes per example and evaluation (ignored by the exact trace).
  lik.rtol = 1e-5  # relative tolerance of the Dormand-Prince solver.
  lik.atol = 1e-5  # absolute tolerance of the Dormand-Prince solver.
  lik.num_examples = 1000  # test examples evaluated (images: the first ones of the split; toys: drawn from the truth).
  lik.repeats = 1  # images: uniform dequantization draws per example; toys: probe draws (1 with the exact trace).
  lik.batch_size = 200  # examples per compiled call (and per resumable unit written to the workdir).
  lik.split = "test"  # image split evaluated (toys: ignored).

  config.lock()
  return config
