"""Task data for this project (SST-5, CFIMDB, Quora, sonnets).

This package deliberately shadows the Hugging Face `datasets` package inside the repository; the
project does not depend on that one. Keep this module free of side effects so the shadowing is
harmless for libraries that merely probe `import datasets`.
"""

IS_PROJECT_DATASETS = True
