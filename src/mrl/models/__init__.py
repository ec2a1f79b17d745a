"""Networks: the timm backbone wrapper and the Matryoshka heads built from config."""
