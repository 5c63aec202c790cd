"""The variant test matrix: every registry entry must appear in at least one case here
(tests/test_variants.py checks that), so adding a variant to the registry adds its tests."""

VARIANT_CASES: dict[str, dict] = {
    "lora": dict(use_lora=True),
    "rslora": dict(use_lora=True, lora_rslora=True),
    "dora": dict(use_lora=True, lora_dora=True),
    "lora_gaussian": dict(use_lora=True, lora_init="gaussian"),
    "pissa": dict(use_lora=True, lora_init="pissa"),
    "lora_plus_some_layers": dict(use_lora=True, lora_plus_ratio=16.0, lora_layers=(1,), lora_targets=("qkv",)),
    "kora": dict(use_kora=True),
    "kora_query": dict(use_kora=True, kora_target="query"),
    "lora+kora": dict(use_lora=True, use_kora=True),
}
MERGEABLE = {"lora", "rslora", "dora", "lora_gaussian", "pissa", "lora_plus_some_layers"}
