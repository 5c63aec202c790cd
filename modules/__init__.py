"""Building blocks of the GPT-2 layer and the variants that replace or extend them."""
