"""Every configuration key of layerskip_jax, with its default and a one-line comment.

Presets (the other files in this folder) start from this and override only what differs. Any key can be set on
the command line as `--config.section.key=value`. `layerskip_jax.config.validate` checks the whole config before
anything compiles. The model defaults are the CPU-sized `tiny` shape; the published presets override them.

Adding a config key:
  1. Here: the key, its default and a one-line comment (a test checks every key has one).
  2. `model` and `layerskip` keys: the field of the same name in ModelConfig (model/model_config.py) or
     ObjectiveConfig (objective/objective_config.py), with its allowed values beside it: `choice(default, allowed)`
     or `bounded(default, low=..., high=...)`. validate() reads them from there, and a key here without its field
     (or a required field without its key) is a one-line error naming the key.
     Keys of the other sections: their range, if any, in config.py's _RANGES.
  3. Relations between keys (one must divide another, ...): config.py's _validate_relations.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()

  # --- model: Hugging Face Llama names (config.json keys), plus our numerics options -------------------------
  c.model = m = config_dict.ConfigDict()
  m.vocab_size = 1024  # tokens in the vocabulary (rows of the embedding and of the LM head)
  m.hidden_size = 256  # width of the residual stream
  m.intermediate_size = 688  # width of the SwiGLU MLP
  m.num_hidden_layers = 8  # L, the number of decoder layers (exit E = 1..L)
  m.num_attention_heads = 4  # query heads
  m.num_key_value_heads = 2  # key/value heads (grouped-query attention); must divide num_attention_heads
  m.head_dim = 0  # per-head width; 0 means hidden_size // num_attention_heads
  m.rope_theta = 10000.0  # RoPE base frequency
  m.rope_scaling = config_dict.ConfigDict()
  m.rope_scaling.rope_type = 'default'  # 'default' (none), 'linear', or 'llama3' (Llama 3.1 / 3.2 scaling)
  m.rope_scaling.factor = 8.0  # 'linear' and 'llama3': context extension factor
  m.rope_scaling.low_freq_factor = 1.0  # 'llama3' only
  m.rope_scaling.high_freq_factor = 4.0  # 'llama3' only
  m.rope_scaling.original_max_position_embeddings = 8192  # 'llama3' only: context length before scaling
  m.rms_norm_eps = 1e-5  # epsilon of every RMSNorm
  m.max_position_embeddings = 2048  # longest sequence the model is meant for (train.seq_len must not exceed it)
  m.tie_word_embeddings = False  # LM head shares the embedding matrix (Llama 3.2 1B)
  m.initializer_range = 0.02  # std of the normal initialiser of every weight matrix
  m.dtype = 'float32'  # compute dtype of matmuls and activations: float32, bfloat16 or float16
  m.param_dtype = 'float32'  # storage dtype of parameters: float32, bfloat16 or float16
  m.remat_policy = 'full'  # per-layer rematerialisation: none, full, save_dots, save_proj (model/model_config.py);
  #   full is the fastest on CPU (docs/results/measurements.md); a skipped (per_batch dropout) layer then costs nothing
  m.attention_impl = 'auto'  # auto, blockwise, xla (dense), cudnn, pallas_gpu, splash: model/attention.py says which is
  #   used where; auto = cudnn on GPU (bf16/fp16), splash on TPU, blockwise (flash-style, plain JAX) on CPU
  m.attention_block = 512  # query/key block of the blockwise and Pallas attention kernels (memory ~ block^2 per head)
  m.scan_unroll = 1  # layers per iteration of the layer scan (1 = rolled; num_hidden_layers = fully unrolled)

  # --- layerskip: the training recipe (spec section 1) ----------------------------------------------------
  c.layerskip = ls = config_dict.ConfigDict()
  ls.p_max = 0.1  # layer-dropout rate of the last layer at the end of training; 0 turns layer dropout off
  ls.depth_schedule = 'exp'  # D(l): exp (the paper's), uniform, linear, log, sin, sigmoid
  ls.time_schedule = 'constant'  # S(t): constant (continual pretraining) or exp (pretraining from scratch)
  ls.dropout_mode = 'per_sample'  # per_sample (one draw per sequence and layer) or per_batch (skips compute)
  ls.e_scale = 1.0  # early-exit loss scale; 0 trains the last exit only
  ls.curriculum = 'rotational'  # which exits are supervised: rotational, gradual, none (all, every step)
  ls.rotation_period = 4  # R of the rotational curriculum
  ls.exit_token_fraction = 1.0  # share of token positions each early exit's loss is computed on (1.0 = all)
  ls.ce_chunk_len = 512  # sequence positions per chunk of each exit's cross-entropy (bounds the logits in memory)
  ls.distill_weight = 0.0  # lambda of self-distillation (spec 1.5): exit loss (1 - l) CE + l D(last || exit); 0 = paper
  ls.distill = 'soft'  # D: soft (KL to the last exit's distribution at distill_temperature) or hard (CE with its top-1)
  ls.distill_temperature = 1.0  # tau of soft distillation (the KL is scaled by tau^2)
  ls.distill_warmup = 0.0  # share of train.steps over which lambda ramps linearly from 0 (0 = constant lambda)
  ls.draft_exit = 0  # an exit E supervised at every step besides the curriculum (the one you draft from); 0 = none

  # --- train ----------------------------------------------------------------------------------------------
  c.train = t = config_dict.ConfigDict()
  t.steps = 1000  # T, the number of optimizer updates of the run
  t.batch_size = 8  # global batch (sequences) per optimizer update
  t.grad_accum_steps = 1  # microbatches per update; must divide batch_size
  t.seq_len = 256  # tokens per training sequence
  t.seed = 0  # seed of parameter init, layer-dropout masks and data order
  t.learning_rate = 1e-3  # peak learning rate (AdamW), reached after warmup_steps
  t.warmup_steps = 50  # linear warmup from 0
  t.min_lr_ratio = 0.1  # cosine decay ends at learning_rate * min_lr_ratio at train.steps
  t.weight_decay = 0.1  # AdamW decoupled weight decay (never applied to norm scales)
  t.adam_b1 = 0.9  # AdamW beta1
  t.adam_b2 = 0.95  # AdamW beta2
  t.adam_eps = 1e-8  # AdamW epsilon
  t.grad_clip_norm = 1.0  # clip the global gradient norm to this (0 = no clipping)
  t.init_from = ''  # checkpoint directory to start from (weights only, fresh optimizer, step 0): continual pretraining
  t.log_every = 10  # steps between metrics rows (metrics.jsonl, TensorBoard); other steps' metrics stay on device
  t.eval_every = 100  # steps between held-out evaluations of every exit (0 = only at the end)
  t.eval_batches = 4  # batches of batch_size held-out sequences per evaluation (run in train microbatches)
  t.peak_tflops = 0.28  # peak TFLOP/s of one device, the MFU denominator (0.28: a 2-core CPU in float32)

  # --- checkpoint (Orbax) ------------------------------------------------------------------------------------
  c.checkpoint = ck = config_dict.ConfigDict()
  ck.every_steps = 100  # steps between checkpoints (and one at the end, and on SIGTERM/SIGINT)
  ck.keep = 3  # checkpoints kept (oldest deleted first)
  ck.async_save = True  # write checkpoints in the background while training continues
  ck.preemption_check_every = 10  # steps between the processes' agreeing on a SIGTERM (an all-gather; 1 process: each)

  # --- logging ---------------------------------------------------------------------------------------------------
  c.logging = lg = config_dict.ConfigDict()
  lg.tensorboard = True  # event files under WORKDIR/tb/ (tensorboardX)
  lg.wandb = False  # also log to Weights & Biases (when wandb is installed)
  lg.wandb_project = 'layerskip_jax'  # W&B project name
  lg.progress_bar = True  # a console progress bar (off: one line per log step)
  lg.profile_steps = ''  # 'FIRST,LAST': a profiler trace of steps FIRST..LAST into WORKDIR/tb ('' = off)

  # --- data -------------------------------------------------------------------------------------------------
  c.data = d = config_dict.ConfigDict()
  d.source = 'python_stdlib'  # corpus: python_stdlib, a directory, a glob, a list file, tfds:NAME[:VERSION], shards
  d.cache_dir = '~/.cache/layerskip_jax'  # where auto-prepared data (tokenizer, shards) is cached
  d.tokenizer = ''  # tokenizer.model / tokenizer.json; '' = init_from's, else train one on the source (vocab_size)
  d.train_split = 'train'  # split trained on (python_stdlib and local files: train / heldout by stable hash)
  d.eval_split = 'heldout'  # split evaluated on ('' = no evaluation; tfds: e.g. validation)
  d.tfds_data_dir = ''  # data_dir of tfds:NAME sources ('' = tfds's default)
  d.text_key = 'text'  # text field of tfds records
  d.num_workers = 0  # threads that read and pack global batches ahead (0: the prefetch thread does it alone)
  d.prefetch = 2  # global batches read and put on devices ahead by a background thread (0 = none, read in the loop)

  # --- mesh: devices = data x fsdp x tensor; within-node (ici) times across-node (dcn) sizes ------------------
  c.mesh = ms = config_dict.ConfigDict()
  ms.data = 1  # pure data parallelism (replicated parameters); -1 fills the remaining devices
  ms.fsdp = -1  # fully-sharded data parallelism (parameters sharded over their embed axis); -1 fills
  ms.tensor = 1  # tensor parallelism (heads, MLP and vocab axes)
  ms.dcn_data = 1  # data-parallel size across nodes/slices (multiplies data)
  ms.dcn_fsdp = 1  # fsdp size across nodes/slices (multiplies fsdp)
  ms.dcn_tensor = 1  # tensor size across nodes/slices (rarely > 1)

  c.lock()
  return c
