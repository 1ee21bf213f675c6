"""The names of a Megatron config that need no check of their own (data for ``arg_policy``).

- :data:`GATED`: shape only a feature that another name turns on; that name (its gate) is
  served or refused in ``arg_policy``, so these are inert while the checkpoint is served.
- :data:`IRRELEVANT` / :data:`IRRELEVANT_PREFIXES`: training or runtime only (parallelism,
  dropout, initialisation, kernels and fusions, recompute and offloading, training-precision
  recipes whose checkpoints hold plain weights, optimizer, data, logging, checkpointing, RL,
  inference-engine knobs). Prefixes cover Megatron-LM-only argument families; every
  ``TransformerConfig`` field is named explicitly.

Sources: megatron-core ``TransformerConfig``/``ModelParallelConfig`` fields of 0.14.0-0.19.2,
Megatron-LM ``arguments.py`` (and ModelOpt's ``post_training/arguments.py``) of core_v0.14.0
-core_r0.19.0, the attributes Megatron-LM training adds to ``args`` before saving, and
Megatron-Bridge ``GPTModelProvider`` / Llama and Qwen provider fields (0.2-0.6).
"""

from __future__ import annotations


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# gate(s) -> the names that only matter when the gate is on
_GATED_FAMILIES: dict[tuple[str, ...], str] = {
    ("multi_latent_attention",): """
        q_lora_rank kv_lora_rank qk_head_dim qk_pos_emb_head_dim v_head_dim mscale mscale_all_dim
        cache_mla_latents mla_down_proj_fusion
    """,
    ("multi_latent_attention", "position_embedding_type", "rope_type", "enable_gpt_oss"): """
        rotary_scaling_factor yarn_beta_fast yarn_beta_slow yarn_correction_range_round_to_int
        yarn_mscale yarn_mscale_all_dim yarn_original_max_position_embeddings
        yarn_rotary_scaling_factor
    """,
    ("position_embedding_type",): """
        relative_attention_num_buckets relative_attention_max_distance mrope_section
    """,
    ("experimental_attention_variant", "linear_attention_freq"): """
        dsa_indexer_head_dim dsa_indexer_k_norm_epsilon dsa_indexer_k_norm_fp32
        dsa_indexer_loss_coeff dsa_indexer_n_heads dsa_indexer_rope_interleaved
        dsa_indexer_rotate_activation dsa_indexer_scoring_relu dsa_indexer_skip_topk_offset
        dsa_indexer_topk dsa_indexer_topk_freq dsa_indexer_use_sparse_loss dsa_kernel_backend
        linear_conv_kernel_dim linear_key_head_dim linear_num_key_heads linear_num_value_heads
        linear_value_head_dim experimental_attention_variant_loss_scale_func
    """,
    ("is_hybrid_model", "hybrid_layer_pattern", "hybrid_override_pattern"): """
        mamba_head_dim mamba_num_groups mamba_num_heads mamba_state_dim
        mamba_training_ssm_states_dtype mamba_inference_conv_states_dtype
        mamba_inference_ssm_states_dtype use_mamba_mem_eff_path disable_mamba_mem_eff_path
    """,
    ("mtp_num_layers", "mtp_enabled"): """
        mtp_detach_heads mtp_grad_scale_func mtp_hybrid_override_pattern mtp_loss_scaling_factor
        mtp_standalone mtp_use_repeated_layer
    """,
    ("window_size",): "window_attn_skip_freq",
    ("use_mup",): "mup_attn_scale_power mup_base_head_dim mup_base_hidden_size mup_width_mult",
    ("use_kitchen_attention",): "kitchen_attention_backend",
    ("retro_add_retriever",): """
        retro_attention_gate retro_cyclic_train_iters retro_encoder_attention_dropout
        retro_encoder_hidden_dropout retro_encoder_layers retro_num_neighbors
        retro_num_retrieved_chunks retro_project_dir retro_verify_neighbor_count
        retriever_seq_length
    """,
}

GATED: dict[str, tuple[str, ...]] = {
    name: gates for gates, names in _GATED_FAMILIES.items() for name in names.split()
}

# TransformerConfig / ModelParallelConfig fields (explicit; a new field must be classified)
_TRANSFORMER_CONFIG = _names("""
    account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split
    activation_func_fp8_input_store activation_offload_fraction apply_query_key_layer_scaling
    apply_rope_fusion async_tensor_model_parallel_allreduce attention_backend attention_dropout
    attention_softmax_in_fp32 autocast_dtype barrier_with_L1_time batch_invariant_mode
    batch_p2p_comm batch_p2p_sync bias_activation_fusion bias_dropout_fusion
    calculate_per_token_loss clone_scatter_output_in_embedding config_logger_dir
    context_parallel_size cp_comm_type cpu_offloading cpu_offloading_activations
    _cpu_offloading_context cpu_offloading_double_buffering cpu_offloading_num_layers
    cpu_offloading_retain_pinned_cpu_buffers cpu_offloading_weights cross_entropy_fusion_impl
    cross_entropy_loss_fusion cuda_graph_impl cuda_graph_modules
    cuda_graph_retain_backward_graph cuda_graph_scope cuda_graph_use_single_mempool
    cuda_graph_warmup_steps deallocate_pipeline_outputs defer_embedding_wgrad_compute
    delay_offload_until_cuda_graph delay_wgrad_compute delta_offload_bytes_across_pp_ranks
    deterministic_mode disable_bf16_reduced_precision_matmul disable_parameter_transpose_cache
    distribute_saved_activations embedding_init_method embedding_init_method_std enable_autocast
    enable_cuda_graph ep_overlap_early_attn_memory_release expert_gtp_weight_remat_size
    expert_model_parallel_size expert_tensor_parallel_num_weight_shards
    expert_tensor_parallel_size external_cuda_graph finalize_model_grads_func
    fine_grained_activation_offloading fine_grained_offloading_max_inflight_offloads
    first_last_layers_bf16 flash_attention_version flash_decode fp32_residual_connection fp4
    fp4_param fp4_quantizer_factory fp4_recipe fp8 fp8_amax_compute_algo fp8_amax_history_len
    fp8_dot_product_attention fp8_interval fp8_margin fp8_multi_head_attention fp8_output_proj
    fp8_param fp8_quantizer_factory fp8_recipe fp8_wgrad fused_residual_rmsnorm
    fused_single_qkv_rope grad_scale_func grad_sync_func gradient_accumulation_fusion
    gtp_weight_remat_size hidden_dropout hierarchical_context_parallel_sizes
    high_priority_a2a_comm_stream hybrid_context_parallel inference_cuda_graph_scope
    inference_disable_triton_nvls_kernels inference_fuse_tp_communication
    inference_grouped_gemm_backend inference_moe_disable_fused_quant_kernels
    inference_moe_token_dispatcher_type inference_rng_tracker inference_sampling_seed
    init_method init_method_std init_model_with_meta_device log_max_attention_logit
    masked_softmax_fusion max_seqlen_per_dp_cp_rank memory_efficient_layer_norm
    microbatch_group_size_per_vp_stage min_offloaded_tensor_size mlp_chunks_for_prefill
    mlp_chunks_for_training nccl_all_reduce_for_prefill no_sync_func num_layers_at_end_in_bf16
    num_layers_at_start_in_bf16 num_layers_in_first_pipeline_stage
    num_layers_in_last_pipeline_stage num_microbatches_with_partial_activation_checkpoints
    offload_modules output_layer_init_method overlap_p2p_comm overlap_p2p_comm_warmup_flush
    param_sync_func params_dtype perform_initialization persist_layer_norm pipeline_dtype
    pipeline_model_parallel_comm_backend pipeline_model_parallel_layout
    pipeline_model_parallel_size qk_clip qk_clip_alpha qk_clip_threshold recompute_granularity
    recompute_method recompute_modules recompute_num_layers sequence_parallel symmetric_ar_type
    tensor_model_parallel_size tensor_parallel_num_weight_shards test_mode timers
    tp_comm_atomic_ag tp_comm_atomic_rs tp_comm_bootstrap_backend tp_comm_bulk_dgrad
    tp_comm_bulk_wgrad tp_comm_overlap tp_comm_overlap_ag tp_comm_overlap_disable_fc1
    tp_comm_overlap_disable_qkv tp_comm_overlap_rs tp_comm_overlap_rs_dgrad tp_comm_split_ag
    tp_comm_split_rs tp_only_amax_red transformer_impl use_cpu_initialization
    use_grouped_gemm_for_dense_mlp use_inference_optimized_layers use_ring_exchange_p2p
    use_te_activation_func use_te_rng_tracker use_transformer_engine_op_fuser
    variable_seq_lengths virtual_pipeline_model_parallel_size wgrad_deferral_limit
""")
# Notes on the less obvious ones above:
# - apply_query_key_layer_scaling: scores are divided by the layer number and the softmax
#   multiplies it back (``FusedScaleMaskSoftmax(scale=coeff)``); same math, fp16 range only.
# - qk_clip*: rescales q/k weights during the optimizer step; the saved weights are the result.
# - fp8*/fp4*/first_last_layers_bf16: training GEMM precision; torch_dist saves quantized
#   params dequantized (``_clone_or_dequantize_if_needed``), so the weights are plain.
# - transformer_impl, attention_backend, flash_*, fused_*, *_fusion: kernels, same math.

# Megatron-LM arguments (and attributes training adds to ``args``) not in TransformerConfig
_MEGATRON_LM = _names("""
    accumulate_allreduce_grads_in_fp32 adam_beta1 adam_beta2 adam_eps add_position_embedding
    adlr_autoresume adlr_autoresume_interval align_grad_reduce align_param_gather
    allow_ambiguous_pad_tokens app_tag_run_name app_tag_run_version apply_wd_to_qk_layernorm
    async_save async_strategy auto_detect_ckpt_format batch_size bert_binary_head
    bert_embedder_type bert_load bias_gelu_fusion bias_swiglu_fusion biencoder_projection_dim
    biencoder_shared_query_context_model block_data_path calc_ft_timeouts chat_template
    check_for_large_grads check_for_nan_in_loss_and_grad check_for_spiky_loss
    check_weight_hash_across_dp_replicas_interval checkpoint_activations classes_fraction
    clip_grad consumed_train_bins consumed_train_samples consumed_valid_samples
    create_all_gather_group create_attention_mask_in_dataloader cuda_graph_scope_deprecated
    curr_iteration decode_only_cuda_graphs decoder_first_pipeline_num_layers
    decoder_last_pipeline_num_layers decoder_num_layers decoder_seq_length decoupled_lr
    decoupled_min_lr decrease_batch_size_if_needed deprecated_use_mcore_models
    disable_chunked_prefill disable_jit_fuser disable_msc_deprecated
    disable_straggler_on_startup disable_symmetric_registration
    distrib_optim_fully_reshardable_mem_efficient distributed_backend
    distributed_timeout_minutes distributed_timeout_seconds_after_init do_test do_train do_valid
    dump_param_to_param_group_map embedding_path empty_unused_memory_level
    enable_chunked_prefill enable_experimental enable_ft_package enable_full_sharding_in_hsdp
    enable_gloo_process_groups enable_msc enable_one_logger encoder_num_layers
    encoder_seq_length end_weight_decay eod_mask_loss error_injection_rate error_injection_type
    evidence_data_path exp_avg_dtype exp_avg_sq_dtype export_default_te_spec
    export_force_local_attention export_legacy_megatron export_te_mcore_model fake_process_group
    finetune finetune_data_split finetune_hf_dataset fp16_lm_cross_entropy fp4_param_gather
    fp8_param_gather freeze_all_layers freeze_base_for_mtp ft_num_warmup_iters full_validation
    global_batch_size gpu_sniff_test_interval grad_reduce_in_bf16 gradient_reduce_div_fusion
    head_lr_mult high_priority_stream_groups hysteresis ict_head_size ict_load img_h img_w
    indexer_batch_size indexer_log_interval inference_batch_times_seqlen_threshold
    inference_coordinator_port inference_cuda_graph_all_prefills inference_cuda_graph_max_tokens
    inference_disable_ep_consensus inference_dynamic_batching inference_logging_step_interval
    inference_max_batch_size inference_max_requests inference_max_seq_length inference_shards
    inference_text_gen_server_logging inference_use_synchronous_zmq_collectives
    inference_wandb_logging init_method_xavier_uniform initial_loss_scale
    _is_global_batch_size_explicitly_specified iter_per_epoch iteration iterations_to_skip
    keep_fp8_transpose_cache lazy_mpu_init legacy_tokenizer lion_beta1 lion_beta2 load
    load_main_params_from_ckpt load_model_opt_format local_rank logging_level loss_scale
    loss_scale_window lr main_grads_dtype main_params_dtype manual_gc manual_gc_eval
    manual_gc_interval mask_factor mask_prob mask_type max_tokens_to_oom memory_snapshot_path
    merge_file metadata_path micro_batch_size mid_level_dataset_surplus min_loss_scale min_lr
    mmap_bin_files mock_data model_parallel_size model_type multiple_validation_sets
    nccl_communicator_config_path nccl_ub no_load_optim no_load_rng no_persist_layer_norm
    no_save_optim no_save_rng no_weight_decay_cond_type null_tokenizer_eod_id
    null_tokenizer_pad_id num_channels num_classes num_dataset_builder_threads
    num_distributed_optimizer_instances num_floating_point_operations_so_far
    num_layers_per_virtual_pipeline_stage num_speculative_tokens
    num_virtual_stages_per_pipeline_rank num_workers nvtx_ranges object_storage_cache_path
    offset_sampling_seed_by_dp_rank onnx_safe optimizer optimizer_cpu_offload
    optimizer_cuda_graph optimizer_offload_fraction outer_dp_sharding_strategy
    output_bert_embeddings overlap_cpu_optimizer_d2h_h2d overlap_grad_reduce
    overlap_param_gather overlap_param_gather_with_optimizer_step override_ckpt_iteration
    override_opt_param_scheduler patch_dim per_dataset_sequences_path per_split_data_args_path
    perform_rl_step phase_transition_iterations pin_cpu_grads pin_cpu_params
    pretrained_checkpoint qad_train_target query_in_block_prob rampup_batch_size rank
    recompute_activations record_memory_history record_shapes refit_method replication
    replication_factor replication_jump rerun_mode reset_attention_mask reset_position_ids
    result_rejected_tracker_filename retriever_report_topk_accuracies retriever_score_scaling
    reuse_grad_buf_for_mxfp8_param_ag run_workload_inspector_server sample_rate save
    scatter_gather_tensors_in_pipeline seed sft sft_tokenizer_prompt_format sgd_momentum
    sharp_enabled_group short_seq_prob skip_train skipped_train_samples special_tokens split
    start_eval_at_iter start_weight_decay step_batch_size_schedule stream_ckpt_dequant
    strict_fsdp_dtensor_load suggested_communication_unit_size swin_backbone_type
    te_precision_config_file te_rng_tracker teacher_model_config test_data_path timing_log_level
    timing_log_option titles_data_path torch_fsdp2_reshard_after_forward train_data_path
    train_iters train_samples train_sync_interval transformer_pipeline_model_parallel_size
    trust_remote_code use_checkpoint_args use_checkpoint_opt_param_scheduler use_custom_fsdp
    use_dist_ckpt use_dist_ckpt_deprecated use_distributed_optimizer use_flash_attn
    use_gloo_process_groups use_layer_wise_distributed_optimizer use_layer_wise_param_layout
    use_legacy_static_engine use_megatron_fsdp use_mp_args_from_checkpoint_args
    use_one_sent_docs use_persistent_ckpt_worker use_precision_aware_optimizer
    use_pytorch_profiler use_rotary_position_embeddings use_sharp
    use_tokenizer_model_from_checkpoint_args use_torch_fsdp2 use_torch_optimizer_for_cpu_offload
    use_tp_pp_dp_mapping valid_data_path validation_set_names verify_integrity
    vision_backbone_type vision_pretraining vision_pretraining_type vocab_extra_ids vocab_file
    warmup weight_decay weight_decay_incr_style world_size yaml_cfg
""")
# - add_position_embedding / use_rotary_position_embeddings: deprecated; validate_args folds
#   them into position_embedding_type, which is served.
# - fp8_param_gather / fp4_param_gather: see fp8_param above (saved dequantized).

# Megatron-Bridge GPTModelProvider fields beyond TransformerConfig
_BRIDGE = _names("""
    dense_grouped_gemm generation_config hf_model_id hf_model_revision logit_dtype
    parallel_output _pg_collection scatter_embedding_sequence_parallel tp_comm_overlap_cfg
    use_arbitrary_attention_mask use_transformer_engine_full_layer_spec
""")

# Mixture of experts, training or kernels only: load balancing losses, dispatchers and their
# communication backends, fusions, recompute, logging, upcycling (an initialisation). Token
# dropping (capacity factors) is a training-time limit: like the Hugging Face models and
# SGLang, the loader serves the model dropless. Routing and expert math names are served or
# refused in ``arg_policy``.
_MOE_RUNTIME = _names("""
    moe_aux_loss_coeff moe_deepep_num_sms moe_enable_deepep moe_enable_routing_replay
    moe_expert_capacity_factor moe_expert_rank_capacity_factor moe_extended_tp
    moe_flex_dispatcher_backend moe_flex_dispatcher_num_sms moe_grad_scale_func
    moe_hybridep_num_blocks_permute moe_hybridep_num_blocks_unpermute moe_hybridep_num_sms
    moe_hybridep_num_sms_preprocessing moe_hybridep_pad_uneven_dispatch_inputs
    moe_layer_recompute moe_ncclep_static_shape moe_ncclep_zero_copy
    moe_pad_expert_input_to_capacity moe_pad_experts_for_cuda_graph_inference moe_paged_stash
    moe_paged_stash_buffer_size_factor_cpu moe_paged_stash_buffer_size_factor_cuda
    moe_paged_stash_page_size moe_per_layer_logging moe_permute_fusion
    moe_permute_fusion_into_hybridep moe_router_bias_update_rate moe_router_dtype
    moe_router_fusion moe_router_padding_for_fp8 moe_router_padding_for_quantization
    moe_router_quantile_balancing_ema moe_routing_trace_capture_hidden_states
    moe_routing_trace_capture_logits moe_routing_trace_dump_weights
    moe_routing_trace_max_training_iters moe_routing_trace_path moe_shared_expert_overlap
    moe_token_dispatcher_type moe_token_drop_policy moe_token_dropping
    moe_upcycling_granularity moe_use_legacy_grouped_gemm moe_use_upcycling moe_z_loss_coeff
    overlap_moe_expert_parallel_comm overlap_dispatch_backward_with_experts_wgrad
""")

IRRELEVANT: frozenset[str] = _TRANSFORMER_CONFIG | _MEGATRON_LM | _BRIDGE | _MOE_RUNTIME

# Megatron-LM argument families that are training/runtime only, present and future ones
IRRELEVANT_PREFIXES: tuple[str, ...] = (
    "async_ckpt_", "ckpt_", "data_", "dataloader_", "ddp_", "dino_", "dist_ckpt_", "eval_",
    "exit_", "export_kd_", "fault_injector_", "fim_", "flight_recorder_", "fsdp_", "grpo_",
    "inference_dynamic_batching_", "inprocess_", "langrl_", "log_", "logits_load_",
    "logits_save_", "lr_", "megatron_fsdp_", "muon_", "non_persistent_", "one_logger_",
    "profile", "pytorch_profiler_", "rl_", "save_", "straggler_", "tensorboard_", "tiktoken_",
    "tokenizer_", "wandb_",
)  # fmt: skip
