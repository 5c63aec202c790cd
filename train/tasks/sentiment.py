"""SST-5 (5 labels) and CFIMDB (2 labels) sentiment: a linear head on the last real token."""

from __future__ import annotations

from torch import nn

from model.heads import LastTokenClassifier
from task_data.common import Example
from task_data.sentiment import NUM_LABELS, SPLIT_FILES, load_sentiment
from train.tasks.base import register_task
from train.tasks.classification import ClassificationTask


class SentimentTask(ClassificationTask):
    prediction_header = "Predicted_Sentiment"

    @classmethod
    def data_files(cls) -> list[str]:
        return [pattern.format(name=cls.name) for pattern in SPLIT_FILES.values()]

    def load(self, split: str) -> list[Example]:
        return load_sentiment(self.name, split, self.data_dir)

    def make_head(self, model: nn.Module) -> nn.Module:
        return LastTokenClassifier(model.config.n_embd, self.num_labels, model.config.resid_pdrop)


@register_task
class SST(SentimentTask):
    name = "sst"
    num_labels = NUM_LABELS["sst"]
    default_max_length = 128


@register_task
class CFIMDB(SentimentTask):
    name = "cfimdb"
    num_labels = NUM_LABELS["cfimdb"]
    default_max_length = 512  # long movie reviews
