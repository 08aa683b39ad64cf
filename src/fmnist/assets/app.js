// The classifier page: drop, paste or choose an image, or turn on the camera; POST /predict answers.
"use strict";

// Below this top probability the page says the model is unsure.
const LOW_CONFIDENCE = 0.5;
// Camera frames are cropped to a centred square, scaled to this side and sent as JPEG.
const FRAME_SIDE = 224;
const FRAME_QUALITY = 0.85;
// The pause between camera frames, after each answer.
const FRAME_PAUSE_MS = 100;

const drop = document.getElementById("drop");
const fileInput = document.getElementById("file");
const cameraButton = document.getElementById("camera");
const output = document.getElementById("output");
const photo = document.getElementById("photo");
const photoCaption = document.getElementById("photo-caption");
const preview = document.getElementById("preview");
const video = document.getElementById("video");
const seen = document.getElementById("seen");
const modelInput = document.getElementById("model-input");
const result = document.getElementById("result");
const statusLine = document.getElementById("status");

let stream = null;
let startingCamera = false;
let previewUrl = null;
// Each request takes a ticket; only the answer to the newest one is shown.
let latestTicket = 0;

// -- What the page shows.

function showStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function formatProbability(probability) {
  if (probability < 0.001) return "<0.1%";
  if (probability > 0.999) return ">99.9%";
  return `${(probability * 100).toFixed(1)}%`;
}

function formatMilliseconds(ms) {
  return ms < 10 ? `${ms.toFixed(3)} ms` : `${ms.toFixed(0)} ms`;
}

function span(className, text = "") {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function barRow(name, probability) {
  const row = document.createElement("div");
  row.className = "bar";
  row.dataset.class = name;
  const track = span("track");
  const fill = span("fill");
  // The bar is drawn to scale; the percentage beside it is rounded for reading.
  fill.style.width = `${Math.min(100, Math.max(0, probability * 100))}%`;
  track.append(fill);
  track.setAttribute("aria-hidden", "true");
  row.append(span("label", name), track, span("pct", formatProbability(probability)));
  return row;
}

function lowConfidenceHint() {
  const hint = document.createElement("p");
  hint.id = "hint";
  hint.className = "hint";
  const threshold = `${Math.round(LOW_CONFIDENCE * 100)}%`;
  hint.title = `shown when the top class is under ${threshold}`;
  hint.textContent =
    `The model is unsure: its best guess is under ${threshold}. ` +
    "Try a photo of one article, alone, on a plain background.";
  return hint;
}

function decodeGrey(input) {
  if (!input || typeof input.data !== "string" || !input.width || !input.height) return null;
  try {
    const grey = Uint8Array.from(atob(input.data), (character) => character.charCodeAt(0));
    return grey.length === input.width * input.height ? grey : null;
  } catch {
    return null;
  }
}

function drawModelInput(input) {
  const grey = decodeGrey(input);
  if (!grey) {
    // Older servers send no model_input: the page simply leaves this view out.
    seen.hidden = true;
    return;
  }
  modelInput.width = input.width;
  modelInput.height = input.height;
  const context = modelInput.getContext("2d");
  const image = context.createImageData(input.width, input.height);
  grey.forEach((value, index) => image.data.set([value, value, value, 255], index * 4));
  context.putImageData(image, 0, 0);
  seen.hidden = false;
}

function refreshOutput() {
  output.hidden = photo.hidden && seen.hidden && result.childElementCount === 0;
}

function render(answer) {
  const predictions = answer.predictions;
  result.replaceChildren(...predictions.map(({ class: name, probability }) => barRow(name, probability)));
  const top = predictions[0];
  if (top && top.probability < LOW_CONFIDENCE) result.append(lowConfidenceHint());
  drawModelInput(answer.model_input);
  refreshOutput();
  const time = typeof answer.inference_ms === "number" ? ` · model: ${formatMilliseconds(answer.inference_ms)}` : "";
  showStatus(top ? `${top.class}, ${formatProbability(top.probability)}${time}` : `no classes${time}`);
}

function clearResults() {
  result.replaceChildren();
  seen.hidden = true;
  modelInput.getContext("2d").clearRect(0, 0, modelInput.width, modelInput.height);
  refreshOutput();
}

function showError(message) {
  clearResults();
  showStatus(message, true);
}

// -- Asking the server.

async function classify(blob) {
  const form = new FormData();
  form.append("file", blob, blob.name || "image");
  let response;
  try {
    response = await fetch("/predict", { method: "POST", body: form });
  } catch {
    throw new Error("The server did not answer: is fmnist serve still running?");
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `The server answered HTTP ${response.status}.`);
  if (!Array.isArray(answer.predictions)) throw new Error("The server's answer has no predictions.");
  return answer;
}

// -- Images from a file, a drop or the clipboard.

function forgetPreview() {
  preview.hidden = true;
  preview.removeAttribute("src");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
}

function showPreview(file) {
  forgetPreview();
  previewUrl = URL.createObjectURL(file);
  photoCaption.textContent = "your image";
  // The photo appears once it has loaded: never a broken-image icon.
  photo.hidden = true;
  preview.src = previewUrl;
}

function previewLoaded() {
  if (!preview.getAttribute("src")) return;
  preview.hidden = false;
  photo.hidden = false;
  refreshOutput();
}

function previewFailed() {
  if (!preview.getAttribute("src")) return;
  preview.hidden = true;
  photo.hidden = true;
  refreshOutput();
}

async function classifyFile(file) {
  if (!file) return;
  stopCamera();
  const ticket = ++latestTicket;
  showPreview(file);
  clearResults();
  showStatus(`classifying ${file.name || "the pasted image"}…`);
  try {
    const answer = await classify(file);
    if (ticket === latestTicket) render(answer);
  } catch (error) {
    if (ticket === latestTicket) showError(file.name ? `${file.name}: ${error.message}` : error.message);
  }
}

function chooseFile() {
  fileInput.click();
}

function fileChosen() {
  const file = fileInput.files[0];
  // Cleared, so that choosing the same file again classifies it again.
  fileInput.value = "";
  classifyFile(file);
}

function draggingOver(event) {
  event.preventDefault();
  drop.classList.add("over");
}

function dragLeft(event) {
  if (!event.relatedTarget) drop.classList.remove("over");
}

function dropped(event) {
  // Anywhere on the page: a missed drop must not navigate away to the image.
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) classifyFile(file);
  else showStatus("Drop an image file (PNG, JPEG, WebP, BMP or GIF).", true);
}

function pasted(event) {
  const items = [...(event.clipboardData?.items || [])];
  const item = items.find((entry) => entry.kind === "file" && entry.type.startsWith("image/"));
  if (item) {
    event.preventDefault();
    classifyFile(item.getAsFile());
  } else {
    showStatus("The clipboard holds no image: copy an image, then paste it here.", true);
  }
}

// -- The camera.

function cameraBlocker() {
  if (!window.isSecureContext) {
    return (
      `The camera needs HTTPS or localhost, and this page is at ${location.origin}. ` +
      "Open it at http://localhost on the machine that serves it, or serve it over HTTPS " +
      "(fmnist serve --certfile … --keyfile …)."
    );
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "This browser gives the page no camera: it needs HTTPS or localhost, and a browser with camera support.";
  }
  return null;
}

function cameraErrorMessage(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "PermissionDeniedError":
      return "Camera permission denied: allow the camera for this site in the browser, then turn it on again.";
    case "SecurityError":
      return "The browser blocks the camera on this page: it needs HTTPS or localhost.";
    case "NotFoundError":
    case "DevicesNotFoundError":
    case "OverconstrainedError":
      return "No camera found: connect one, or drop, paste or choose a photo instead.";
    case "NotReadableError":
    case "AbortError":
      return "The camera is busy or failed to start: close other apps that use it, then try again.";
    default:
      return `The camera could not start (${error && error.name}: ${error && error.message}).`;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function grabFrame(canvas) {
  const side = Math.min(video.videoWidth, video.videoHeight);
  const left = (video.videoWidth - side) / 2;
  const top = (video.videoHeight - side) / 2;
  canvas.getContext("2d").drawImage(video, left, top, side, side, 0, 0, FRAME_SIDE, FRAME_SIDE);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", FRAME_QUALITY));
}

async function classifyFrames(session) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = FRAME_SIDE;
  while (stream === session) {
    if (video.videoWidth && video.videoHeight) {
      const frame = await grabFrame(canvas);
      const ticket = ++latestTicket;
      try {
        const answer = frame && (await classify(frame));
        if (answer && stream === session && ticket === latestTicket) render(answer);
      } catch (error) {
        // The error shows in the status line; the next frame tries again.
        if (stream === session && ticket === latestTicket) showError(error.message);
      }
    }
    await sleep(FRAME_PAUSE_MS);
  }
}

async function startCamera() {
  const blocker = cameraBlocker();
  if (blocker) {
    showStatus(blocker, true);
    return;
  }
  startingCamera = true;
  showStatus("starting the camera…");
  let session;
  try {
    session = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false,
    });
  } catch (error) {
    showStatus(cameraErrorMessage(error), true);
    return;
  } finally {
    startingCamera = false;
  }
  stream = session;
  latestTicket += 1;
  forgetPreview();
  clearResults();
  video.srcObject = stream;
  video.hidden = false;
  photo.hidden = false;
  photoCaption.textContent = "camera";
  cameraButton.textContent = "Turn off camera";
  cameraButton.setAttribute("aria-pressed", "true");
  // Answers change several times a second: a screen reader would never finish one.
  result.setAttribute("aria-live", "off");
  refreshOutput();
  showStatus("camera on: classifying frames…");
  for (const track of stream.getVideoTracks()) track.addEventListener("ended", cameraEnded);
  classifyFrames(stream);
}

function stopCamera() {
  if (!stream) return false;
  for (const track of stream.getTracks()) track.stop();
  stream = null;
  latestTicket += 1;
  video.pause();
  video.srcObject = null;
  video.hidden = true;
  photo.hidden = true;
  cameraButton.textContent = "Turn on camera";
  cameraButton.setAttribute("aria-pressed", "false");
  result.setAttribute("aria-live", "polite");
  clearResults();
  showStatus("camera off");
  return true;
}

function cameraEnded() {
  if (stopCamera()) showStatus("The camera stopped (unplugged, or taken by another app).", true);
}

function toggleCamera() {
  if (startingCamera) return;
  if (!stopCamera()) startCamera();
}

// -- Wiring.

preview.addEventListener("load", previewLoaded);
preview.addEventListener("error", previewFailed);
drop.addEventListener("click", chooseFile);
fileInput.addEventListener("change", fileChosen);
document.addEventListener("dragover", draggingOver);
document.addEventListener("dragleave", dragLeft);
document.addEventListener("drop", dropped);
document.addEventListener("paste", pasted);
cameraButton.addEventListener("click", toggleCamera);
