"""Golden graphs of the cache passes and the lowering, and the cases where they must not fire."""

from __future__ import annotations

import pytest
import torch
from expecttest import TestCase

import sc_compile
from sc_compile.calibration.fitting import FittedCoefficients, SecondOrderCoefficients
from sc_compile.calibration.table import AlphaTable
from sc_compile.passes.find_blocks import NoBlocksFoundError
from sc_compile.passes.module_paths import normalize_module_path, top_level_block_of

from dummy_dit import DummyDiT, NotADiT


def _explain(model: torch.nn.Module, granularity: str = "block", prediction: str = "hidden"):
    return sc_compile.explain(
        model, torch.ones(1, 2, 4), torch.tensor([1.0]), granularity=granularity, prediction=prediction
    )


class GoldenGraphs(TestCase):
    maxDiff = None

    def test_before_after_and_lowered_graphs(self):
        explanation = _explain(DummyDiT(gains=(1.0, 0.5)))
        self.assertExpectedInline(
            explanation.graph_before,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_timestep_: "f32[1]", L_self_modules_blocks_modules_0_parameters_gain_: "f32[]", L_hidden_states_: "f32[1, 2, 4]", L_self_modules_blocks_modules_1_parameters_gain_: "f32[]"):
        l_timestep_ = L_timestep_
        l_self_modules_blocks_modules_0_parameters_gain_ = L_self_modules_blocks_modules_0_parameters_gain_
        l_hidden_states_ = L_hidden_states_
        l_self_modules_blocks_modules_1_parameters_gain_ = L_self_modules_blocks_modules_1_parameters_gain_

        temb: "f32[1, 1, 1]" = l_timestep_.reshape(-1, 1, 1);  l_timestep_ = None

        mul: "f32[1, 2, 4]" = l_self_modules_blocks_modules_0_parameters_gain_ * l_hidden_states_;  l_self_modules_blocks_modules_0_parameters_gain_ = None
        add: "f32[1, 2, 4]" = l_hidden_states_ + mul;  l_hidden_states_ = mul = None
        mul_1: "f32[1, 1, 1]" = temb * 0.0
        hidden_states: "f32[1, 2, 4]" = add + mul_1;  add = mul_1 = None
        mul_2: "f32[1, 2, 4]" = l_self_modules_blocks_modules_1_parameters_gain_ * hidden_states;  l_self_modules_blocks_modules_1_parameters_gain_ = None
        add_2: "f32[1, 2, 4]" = hidden_states + mul_2;  hidden_states = mul_2 = None
        mul_3: "f32[1, 1, 1]" = temb * 0.0;  temb = None
        hidden_states_1: "f32[1, 2, 4]" = add_2 + mul_3;  add_2 = mul_3 = None

        mul_4: "f32[1, 2, 4]" = hidden_states_1 * 2.0;  hidden_states_1 = None
        return (mul_4,)
""",
        )
        self.assertExpectedInline(
            explanation.graph_after,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_timestep_: "f32[1]", L_self_modules_blocks_modules_0_parameters_gain_: "f32[]", L_hidden_states_: "f32[1, 2, 4]", L_self_modules_blocks_modules_1_parameters_gain_: "f32[]", sc_is_full: "b8[]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
        l_timestep_ = L_timestep_
        l_self_modules_blocks_modules_0_parameters_gain_ = L_self_modules_blocks_modules_0_parameters_gain_
        l_hidden_states_ = L_hidden_states_
        l_self_modules_blocks_modules_1_parameters_gain_ = L_self_modules_blocks_modules_1_parameters_gain_

        temb: "f32[1, 1, 1]" = l_timestep_.reshape(-1, 1, 1);  l_timestep_ = None

        sc_full_blocks_0 = self.sc_full_blocks_0
        sc_cached_blocks_0 = self.sc_cached_blocks_0
        cond = torch.ops.higher_order.cond(sc_is_full, sc_full_blocks_0, sc_cached_blocks_0, (l_self_modules_blocks_modules_0_parameters_gain_, l_hidden_states_, temb, sc_y_full_0, sc_dy_0, sc_coef, sc_refresh, sc_stats));  sc_full_blocks_0 = sc_cached_blocks_0 = l_self_modules_blocks_modules_0_parameters_gain_ = l_hidden_states_ = sc_y_full_0 = sc_dy_0 = None

        getitem: "f32[1, 2, 4]" = cond[0];  cond = None

        sc_full_blocks_1 = self.sc_full_blocks_1
        sc_cached_blocks_1 = self.sc_cached_blocks_1
        cond_1 = torch.ops.higher_order.cond(sc_is_full, sc_full_blocks_1, sc_cached_blocks_1, (l_self_modules_blocks_modules_1_parameters_gain_, getitem, temb, sc_y_full_1, sc_dy_1, sc_coef, sc_refresh, sc_stats));  sc_is_full = sc_full_blocks_1 = sc_cached_blocks_1 = l_self_modules_blocks_modules_1_parameters_gain_ = getitem = temb = sc_y_full_1 = sc_dy_1 = sc_coef = sc_refresh = sc_stats = None

        getitem_1: "f32[1, 2, 4]" = cond_1[0];  cond_1 = None

        mul_4: "f32[1, 2, 4]" = getitem_1 * 2.0;  getitem_1 = None
        return (mul_4,)

    class sc_full_blocks_0(torch.nn.Module):
        def forward(self, l_self_modules_blocks_modules_0_parameters_gain_: "f32[]", l_hidden_states_: "f32[1, 2, 4]", temb: "f32[1, 1, 1]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
            mul: "f32[1, 2, 4]" = l_self_modules_blocks_modules_0_parameters_gain_ * l_hidden_states_;  l_self_modules_blocks_modules_0_parameters_gain_ = None
            add: "f32[1, 2, 4]" = l_hidden_states_ + mul;  l_hidden_states_ = mul = None
            mul_1: "f32[1, 1, 1]" = temb * 0.0;  temb = None
            hidden_states: "f32[1, 2, 4]" = add + mul_1;  add = mul_1 = None

            float_1 = hidden_states.float()
            float_2 = sc_y_full_0.float()
            float_3 = sc_dy_0.float()
            getitem = sc_coef[0];  sc_coef = None
            getitem_1 = sc_refresh[0];  sc_refresh = None
            mul_2 = float_3 * getitem;  float_3 = getitem = None
            add_1 = float_2 + mul_2;  mul_2 = None
            sub = float_1 - add_1
            sub_1 = float_1 - float_2;  float_2 = None
            mul_3 = sub_1 * getitem_1;  sub_1 = getitem_1 = None
            abs_1 = sub.abs();  sub = None
            sum_1 = abs_1.sum();  abs_1 = None
            abs_2 = add_1.abs();  add_1 = None
            sum_2 = abs_2.sum();  abs_2 = None
            abs_3 = mul_3.abs()
            sum_3 = abs_3.sum();  abs_3 = None
            abs_4 = float_1.abs();  float_1 = None
            sum_4 = abs_4.sum();  abs_4 = None
            stack = torch.stack([sum_1, sum_2, sum_3, sum_4]);  sum_1 = sum_2 = sum_3 = sum_4 = None
            select_int = torch.ops.aten.select.int(sc_stats, 0, 0);  sc_stats = None
            copy__default = torch.ops.aten.copy_.default(select_int, stack);  select_int = stack = copy__default = None
            to = mul_3.to(torch.float32);  mul_3 = None
            copy__default_1 = torch.ops.aten.copy_.default(sc_dy_0, to);  sc_dy_0 = to = copy__default_1 = None
            copy__default_2 = torch.ops.aten.copy_.default(sc_y_full_0, hidden_states);  sc_y_full_0 = copy__default_2 = None
            return (hidden_states,)

    class sc_cached_blocks_0(torch.nn.Module):
        def forward(self, l_self_modules_blocks_modules_0_parameters_gain_: "f32[]", l_hidden_states_: "f32[1, 2, 4]", temb: "f32[1, 1, 1]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
            getitem = sc_coef[0];  sc_coef = None
            mul = sc_dy_0 * getitem;  sc_dy_0 = getitem = None
            add = sc_y_full_0 + mul;  sc_y_full_0 = mul = None
            to = add.to(torch.float32);  add = None
            return (to,)

    class sc_full_blocks_1(torch.nn.Module):
        def forward(self, l_self_modules_blocks_modules_1_parameters_gain_: "f32[]", getitem: "f32[1, 2, 4]", temb: "f32[1, 1, 1]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
            mul_2: "f32[1, 2, 4]" = l_self_modules_blocks_modules_1_parameters_gain_ * getitem;  l_self_modules_blocks_modules_1_parameters_gain_ = None
            add_2: "f32[1, 2, 4]" = getitem + mul_2;  getitem = mul_2 = None
            mul_3: "f32[1, 1, 1]" = temb * 0.0;  temb = None
            hidden_states_1: "f32[1, 2, 4]" = add_2 + mul_3;  add_2 = mul_3 = None

            float_1 = hidden_states_1.float()
            float_2 = sc_y_full_1.float()
            float_3 = sc_dy_1.float()
            getitem_1 = sc_coef[1];  sc_coef = None
            getitem_2 = sc_refresh[1];  sc_refresh = None
            mul = float_3 * getitem_1;  float_3 = getitem_1 = None
            add = float_2 + mul;  mul = None
            sub = float_1 - add
            sub_1 = float_1 - float_2;  float_2 = None
            mul_4 = sub_1 * getitem_2;  sub_1 = getitem_2 = None
            abs_1 = sub.abs();  sub = None
            sum_1 = abs_1.sum();  abs_1 = None
            abs_2 = add.abs();  add = None
            sum_2 = abs_2.sum();  abs_2 = None
            abs_3 = mul_4.abs()
            sum_3 = abs_3.sum();  abs_3 = None
            abs_4 = float_1.abs();  float_1 = None
            sum_4 = abs_4.sum();  abs_4 = None
            stack = torch.stack([sum_1, sum_2, sum_3, sum_4]);  sum_1 = sum_2 = sum_3 = sum_4 = None
            select_int = torch.ops.aten.select.int(sc_stats, 0, 1);  sc_stats = None
            copy__default = torch.ops.aten.copy_.default(select_int, stack);  select_int = stack = copy__default = None
            to = mul_4.to(torch.float32);  mul_4 = None
            copy__default_1 = torch.ops.aten.copy_.default(sc_dy_1, to);  sc_dy_1 = to = copy__default_1 = None
            copy__default_2 = torch.ops.aten.copy_.default(sc_y_full_1, hidden_states_1);  sc_y_full_1 = copy__default_2 = None
            return (hidden_states_1,)

    class sc_cached_blocks_1(torch.nn.Module):
        def forward(self, l_self_modules_blocks_modules_1_parameters_gain_: "f32[]", getitem: "f32[1, 2, 4]", temb: "f32[1, 1, 1]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
            getitem_1 = sc_coef[1];  sc_coef = None
            mul = sc_dy_1 * getitem_1;  sc_dy_1 = getitem_1 = None
            add = sc_y_full_1 + mul;  sc_y_full_1 = mul = None
            to = add.to(torch.float32);  add = None
            return (to,)
""",
        )
        self.assertExpectedInline(
            explanation.full_step_graph,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_timestep_: "f32[1]", L_self_modules_blocks_modules_0_parameters_gain_: "f32[]", L_hidden_states_: "f32[1, 2, 4]", L_self_modules_blocks_modules_1_parameters_gain_: "f32[]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
        l_timestep_ = L_timestep_
        l_self_modules_blocks_modules_0_parameters_gain_ = L_self_modules_blocks_modules_0_parameters_gain_
        l_hidden_states_ = L_hidden_states_
        l_self_modules_blocks_modules_1_parameters_gain_ = L_self_modules_blocks_modules_1_parameters_gain_

        temb: "f32[1, 1, 1]" = l_timestep_.reshape(-1, 1, 1);  l_timestep_ = None

        mul: "f32[1, 2, 4]" = l_self_modules_blocks_modules_0_parameters_gain_ * l_hidden_states_;  l_self_modules_blocks_modules_0_parameters_gain_ = None
        add: "f32[1, 2, 4]" = l_hidden_states_ + mul;  l_hidden_states_ = mul = None
        mul_1: "f32[1, 1, 1]" = temb * 0.0
        hidden_states: "f32[1, 2, 4]" = add + mul_1;  add = mul_1 = None

        float_1 = hidden_states.float()
        float_2 = sc_y_full_0.float()
        float_3 = sc_dy_0.float()
        getitem_2 = sc_coef[0]
        getitem_3 = sc_refresh[0]
        mul_2 = float_3 * getitem_2;  float_3 = getitem_2 = None
        add_1 = float_2 + mul_2;  mul_2 = None
        sub = float_1 - add_1
        sub_1 = float_1 - float_2;  float_2 = None
        mul_3 = sub_1 * getitem_3;  sub_1 = getitem_3 = None
        abs_1 = sub.abs();  sub = None
        sum_1 = abs_1.sum();  abs_1 = None
        abs_2 = add_1.abs();  add_1 = None
        sum_2 = abs_2.sum();  abs_2 = None
        abs_3 = mul_3.abs()
        sum_3 = abs_3.sum();  abs_3 = None
        abs_4 = float_1.abs();  float_1 = None
        sum_4 = abs_4.sum();  abs_4 = None
        stack = torch.stack([sum_1, sum_2, sum_3, sum_4]);  sum_1 = sum_2 = sum_3 = sum_4 = None
        select_int = torch.ops.aten.select.int(sc_stats, 0, 0)
        copy__default = torch.ops.aten.copy_.default(select_int, stack);  select_int = stack = copy__default = None
        to = mul_3.to(torch.float32);  mul_3 = None
        copy__default_1 = torch.ops.aten.copy_.default(sc_dy_0, to);  sc_dy_0 = to = copy__default_1 = None
        copy__default_2 = torch.ops.aten.copy_.default(sc_y_full_0, hidden_states);  sc_y_full_0 = copy__default_2 = None

        mul_5: "f32[1, 2, 4]" = l_self_modules_blocks_modules_1_parameters_gain_ * hidden_states;  l_self_modules_blocks_modules_1_parameters_gain_ = None
        add_2: "f32[1, 2, 4]" = hidden_states + mul_5;  hidden_states = mul_5 = None
        mul_6: "f32[1, 1, 1]" = temb * 0.0;  temb = None
        hidden_states_1: "f32[1, 2, 4]" = add_2 + mul_6;  add_2 = mul_6 = None

        float_4 = hidden_states_1.float()
        float_5 = sc_y_full_1.float()
        float_6 = sc_dy_1.float()
        getitem_4 = sc_coef[1];  sc_coef = None
        getitem_5 = sc_refresh[1];  sc_refresh = None
        mul_7 = float_6 * getitem_4;  float_6 = getitem_4 = None
        add_3 = float_5 + mul_7;  mul_7 = None
        sub_2 = float_4 - add_3
        sub_3 = float_4 - float_5;  float_5 = None
        mul_8 = sub_3 * getitem_5;  sub_3 = getitem_5 = None
        abs_5 = sub_2.abs();  sub_2 = None
        sum_5 = abs_5.sum();  abs_5 = None
        abs_6 = add_3.abs();  add_3 = None
        sum_6 = abs_6.sum();  abs_6 = None
        abs_7 = mul_8.abs()
        sum_7 = abs_7.sum();  abs_7 = None
        abs_8 = float_4.abs();  float_4 = None
        sum_8 = abs_8.sum();  abs_8 = None
        stack_1 = torch.stack([sum_5, sum_6, sum_7, sum_8]);  sum_5 = sum_6 = sum_7 = sum_8 = None
        select_int_1 = torch.ops.aten.select.int(sc_stats, 0, 1);  sc_stats = None
        copy__default_3 = torch.ops.aten.copy_.default(select_int_1, stack_1);  select_int_1 = stack_1 = copy__default_3 = None
        to_1 = mul_8.to(torch.float32);  mul_8 = None
        copy__default_4 = torch.ops.aten.copy_.default(sc_dy_1, to_1);  sc_dy_1 = to_1 = copy__default_4 = None
        copy__default_5 = torch.ops.aten.copy_.default(sc_y_full_1, hidden_states_1);  sc_y_full_1 = copy__default_5 = None

        mul_4: "f32[1, 2, 4]" = hidden_states_1 * 2.0;  hidden_states_1 = None
        return (mul_4,)
""",
        )
        self.assertExpectedInline(
            explanation.cached_step_graph,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]"):
        getitem_3 = sc_coef[1];  sc_coef = None
        mul_5 = sc_dy_1 * getitem_3;  sc_dy_1 = getitem_3 = None
        add_1 = sc_y_full_1 + mul_5;  sc_y_full_1 = mul_5 = None
        to_1 = add_1.to(torch.float32);  add_1 = None

        mul_4: "f32[1, 2, 4]" = to_1 * 2.0;  to_1 = None
        return (mul_4,)
""",
        )

    def test_residual_prediction_graphs(self):
        explanation = _explain(DummyDiT(gains=(1.0, 0.5)), prediction="residual")
        # Full step: the stored value is the point minus its anchor (the block input; "+ temb * 0"
        # is a bias add, which the anchor drops with the residual branch).
        self.assertExpectedInline(
            explanation.full_step_graph,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_timestep_: "f32[1]", L_self_modules_blocks_modules_0_parameters_gain_: "f32[]", L_hidden_states_: "f32[1, 2, 4]", L_self_modules_blocks_modules_1_parameters_gain_: "f32[]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_stats: "f32[2, 4]"):
        l_timestep_ = L_timestep_
        l_self_modules_blocks_modules_0_parameters_gain_ = L_self_modules_blocks_modules_0_parameters_gain_
        l_hidden_states_ = L_hidden_states_
        l_self_modules_blocks_modules_1_parameters_gain_ = L_self_modules_blocks_modules_1_parameters_gain_

        temb: "f32[1, 1, 1]" = l_timestep_.reshape(-1, 1, 1);  l_timestep_ = None

        mul: "f32[1, 2, 4]" = l_self_modules_blocks_modules_0_parameters_gain_ * l_hidden_states_;  l_self_modules_blocks_modules_0_parameters_gain_ = None
        add: "f32[1, 2, 4]" = l_hidden_states_ + mul;  mul = None
        mul_1: "f32[1, 1, 1]" = temb * 0.0
        hidden_states: "f32[1, 2, 4]" = add + mul_1;  add = mul_1 = None

        float_1 = hidden_states.float()
        float_2 = l_hidden_states_.float();  l_hidden_states_ = None
        sub = float_1 - float_2;  float_1 = float_2 = None
        to = sub.to(torch.float32)
        float_3 = sc_y_full_0.float()
        float_4 = sc_dy_0.float()
        getitem_2 = sc_coef[0]
        getitem_3 = sc_refresh[0]
        mul_2 = float_4 * getitem_2;  float_4 = getitem_2 = None
        add_1 = float_3 + mul_2;  mul_2 = None
        sub_1 = sub - add_1
        sub_2 = sub - float_3;  float_3 = None
        mul_3 = sub_2 * getitem_3;  sub_2 = getitem_3 = None
        abs_1 = sub_1.abs();  sub_1 = None
        sum_1 = abs_1.sum();  abs_1 = None
        abs_2 = add_1.abs();  add_1 = None
        sum_2 = abs_2.sum();  abs_2 = None
        abs_3 = mul_3.abs()
        sum_3 = abs_3.sum();  abs_3 = None
        abs_4 = sub.abs();  sub = None
        sum_4 = abs_4.sum();  abs_4 = None
        stack = torch.stack([sum_1, sum_2, sum_3, sum_4]);  sum_1 = sum_2 = sum_3 = sum_4 = None
        select_int = torch.ops.aten.select.int(sc_stats, 0, 0)
        copy__default = torch.ops.aten.copy_.default(select_int, stack);  select_int = stack = copy__default = None
        to_1 = mul_3.to(torch.float32);  mul_3 = None
        copy__default_1 = torch.ops.aten.copy_.default(sc_dy_0, to_1);  sc_dy_0 = to_1 = copy__default_1 = None
        copy__default_2 = torch.ops.aten.copy_.default(sc_y_full_0, to);  sc_y_full_0 = to = copy__default_2 = None

        mul_5: "f32[1, 2, 4]" = l_self_modules_blocks_modules_1_parameters_gain_ * hidden_states;  l_self_modules_blocks_modules_1_parameters_gain_ = None
        add_2: "f32[1, 2, 4]" = hidden_states + mul_5;  mul_5 = None
        mul_6: "f32[1, 1, 1]" = temb * 0.0;  temb = None
        hidden_states_1: "f32[1, 2, 4]" = add_2 + mul_6;  add_2 = mul_6 = None

        float_5 = hidden_states_1.float()
        float_6 = hidden_states.float();  hidden_states = None
        sub_3 = float_5 - float_6;  float_5 = float_6 = None
        to_2 = sub_3.to(torch.float32)
        float_7 = sc_y_full_1.float()
        float_8 = sc_dy_1.float()
        getitem_4 = sc_coef[1];  sc_coef = None
        getitem_5 = sc_refresh[1];  sc_refresh = None
        mul_7 = float_8 * getitem_4;  float_8 = getitem_4 = None
        add_3 = float_7 + mul_7;  mul_7 = None
        sub_4 = sub_3 - add_3
        sub_5 = sub_3 - float_7;  float_7 = None
        mul_8 = sub_5 * getitem_5;  sub_5 = getitem_5 = None
        abs_5 = sub_4.abs();  sub_4 = None
        sum_5 = abs_5.sum();  abs_5 = None
        abs_6 = add_3.abs();  add_3 = None
        sum_6 = abs_6.sum();  abs_6 = None
        abs_7 = mul_8.abs()
        sum_7 = abs_7.sum();  abs_7 = None
        abs_8 = sub_3.abs();  sub_3 = None
        sum_8 = abs_8.sum();  abs_8 = None
        stack_1 = torch.stack([sum_5, sum_6, sum_7, sum_8]);  sum_5 = sum_6 = sum_7 = sum_8 = None
        select_int_1 = torch.ops.aten.select.int(sc_stats, 0, 1);  sc_stats = None
        copy__default_3 = torch.ops.aten.copy_.default(select_int_1, stack_1);  select_int_1 = stack_1 = copy__default_3 = None
        to_3 = mul_8.to(torch.float32);  mul_8 = None
        copy__default_4 = torch.ops.aten.copy_.default(sc_dy_1, to_3);  sc_dy_1 = to_3 = copy__default_4 = None
        copy__default_5 = torch.ops.aten.copy_.default(sc_y_full_1, to_2);  sc_y_full_1 = to_2 = copy__default_5 = None

        mul_4: "f32[1, 2, 4]" = hidden_states_1 * 2.0;  hidden_states_1 = None
        return (mul_4,)
""",
        )
        # Cached step: each block's predicted residual on top of its current input, the first
        # block's input being the model's real input.
        self.assertExpectedInline(
            explanation.cached_step_graph,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_hidden_states_: "f32[1, 2, 4]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_coef: "f32[2]"):
        l_hidden_states_ = L_hidden_states_

        getitem_2 = sc_coef[0]
        mul = sc_dy_0 * getitem_2;  sc_dy_0 = getitem_2 = None
        add = sc_y_full_0 + mul;  sc_y_full_0 = mul = None
        add_1 = l_hidden_states_ + add;  l_hidden_states_ = add = None
        to = add_1.to(torch.float32);  add_1 = None
        getitem_3 = sc_coef[1];  sc_coef = None
        mul_5 = sc_dy_1 * getitem_3;  sc_dy_1 = getitem_3 = None
        add_2 = sc_y_full_1 + mul_5;  sc_y_full_1 = mul_5 = None
        add_3 = to + add_2;  to = add_2 = None
        to_1 = add_3.to(torch.float32);  add_3 = None

        mul_4: "f32[1, 2, 4]" = to_1 * 2.0;  to_1 = None
        return (mul_4,)
""",
        )

    def test_module_granularity_points(self):
        explanation = _explain(DummyDiT(gains=(1.0, 0.5)), granularity="module")
        # The residual add x + g*x of each block; "+ temb * 0" after it is a broadcast bias add.
        self.assertEqual([b.residual_outputs for b in explanation.blocks], [("add",), ("add_2",)])
        # The block output needs the bias add, which is no cast, view or slice of the point: it is
        # made a point of its own.
        self.assertEqual(
            [p.node_name for p in explanation.cache_points], ["add", "hidden_states", "add_2", "hidden_states_1"]
        )


def _synthetic_table(model: torch.nn.Module, num_points: int) -> AlphaTable:
    """A format-3 table whose second coefficient is 0.5 everywhere (the graphs do not depend on it)."""
    n, k = 4, 1
    fitted = FittedCoefficients(
        coef=torch.ones(n, k + 1, k, num_points),
        refresh=torch.ones(n, k + 1, num_points),
        error=torch.zeros(n, k + 1, k),
        max_gap=torch.ones(n, dtype=torch.int64),
        second=SecondOrderCoefficients(
            coef=torch.full((n, k + 1, k + 1, k, num_points, 2), 0.5), error=torch.zeros(n, k + 1, k + 1, k)
        ),
    )
    return AlphaTable(torch.ones(n, num_points), type(model).__name__, "", "block", fitted=fitted)


class SecondOrderGoldenGraphs(TestCase):
    """The graphs with the difference before last (a table whose two-difference coefficients are in
    use); first-order tables and α = 1 keep GoldenGraphs' graphs."""

    maxDiff = None

    def test_second_order_graphs(self):
        model = DummyDiT(gains=(1.0, 0.5))
        explanation = sc_compile.explain(
            model, torch.ones(1, 2, 4), torch.tensor([1.0]), alpha=_synthetic_table(model, 2)
        )
        self.assertTrue(explanation.second_order)
        self.assertExpectedInline(
            explanation.full_step_graph,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, L_timestep_: "f32[1]", L_self_modules_blocks_modules_0_parameters_gain_: "f32[]", L_hidden_states_: "f32[1, 2, 4]", L_self_modules_blocks_modules_1_parameters_gain_: "f32[]", sc_y_full_0: "f32[1, 2, 4]", sc_dy_0: "f32[1, 2, 4]", sc_dy_prev_0: "f32[1, 2, 4]", sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_dy_prev_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_refresh: "f32[2]", sc_coef2: "f32[2]", sc_stats: "f32[2, 4]"):
        l_timestep_ = L_timestep_
        l_self_modules_blocks_modules_0_parameters_gain_ = L_self_modules_blocks_modules_0_parameters_gain_
        l_hidden_states_ = L_hidden_states_
        l_self_modules_blocks_modules_1_parameters_gain_ = L_self_modules_blocks_modules_1_parameters_gain_

        temb: "f32[1, 1, 1]" = l_timestep_.reshape(-1, 1, 1);  l_timestep_ = None

        mul: "f32[1, 2, 4]" = l_self_modules_blocks_modules_0_parameters_gain_ * l_hidden_states_;  l_self_modules_blocks_modules_0_parameters_gain_ = None
        add: "f32[1, 2, 4]" = l_hidden_states_ + mul;  l_hidden_states_ = mul = None
        mul_1: "f32[1, 1, 1]" = temb * 0.0
        hidden_states: "f32[1, 2, 4]" = add + mul_1;  add = mul_1 = None

        float_1 = hidden_states.float()
        float_2 = sc_y_full_0.float()
        float_3 = sc_dy_0.float()
        getitem_2 = sc_coef[0]
        getitem_3 = sc_refresh[0]
        mul_2 = float_3 * getitem_2;  float_3 = getitem_2 = None
        add_1 = float_2 + mul_2;  mul_2 = None
        float_4 = sc_dy_prev_0.float()
        getitem_4 = sc_coef2[0]
        mul_3 = float_4 * getitem_4;  float_4 = getitem_4 = None
        add_2 = add_1 + mul_3;  add_1 = mul_3 = None
        sub = float_1 - add_2
        sub_1 = float_1 - float_2;  float_2 = None
        mul_5 = sub_1 * getitem_3;  sub_1 = getitem_3 = None
        abs_1 = sub.abs();  sub = None
        sum_1 = abs_1.sum();  abs_1 = None
        abs_2 = add_2.abs();  add_2 = None
        sum_2 = abs_2.sum();  abs_2 = None
        abs_3 = mul_5.abs()
        sum_3 = abs_3.sum();  abs_3 = None
        abs_4 = float_1.abs();  float_1 = None
        sum_4 = abs_4.sum();  abs_4 = None
        stack = torch.stack([sum_1, sum_2, sum_3, sum_4]);  sum_1 = sum_2 = sum_3 = sum_4 = None
        select_int = torch.ops.aten.select.int(sc_stats, 0, 0)
        copy__default = torch.ops.aten.copy_.default(select_int, stack);  select_int = stack = copy__default = None
        neg = -sc_dy_0
        neg_1 = -neg;  neg = None
        to = mul_5.to(torch.float32);  mul_5 = None
        copy__default_1 = torch.ops.aten.copy_.default(sc_dy_prev_0, neg_1);  sc_dy_prev_0 = neg_1 = copy__default_1 = None
        copy__default_2 = torch.ops.aten.copy_.default(sc_dy_0, to);  sc_dy_0 = to = copy__default_2 = None
        copy__default_3 = torch.ops.aten.copy_.default(sc_y_full_0, hidden_states);  sc_y_full_0 = copy__default_3 = None

        mul_6: "f32[1, 2, 4]" = l_self_modules_blocks_modules_1_parameters_gain_ * hidden_states;  l_self_modules_blocks_modules_1_parameters_gain_ = None
        add_3: "f32[1, 2, 4]" = hidden_states + mul_6;  hidden_states = mul_6 = None
        mul_7: "f32[1, 1, 1]" = temb * 0.0;  temb = None
        hidden_states_1: "f32[1, 2, 4]" = add_3 + mul_7;  add_3 = mul_7 = None

        float_5 = hidden_states_1.float()
        float_6 = sc_y_full_1.float()
        float_7 = sc_dy_1.float()
        getitem_5 = sc_coef[1];  sc_coef = None
        getitem_6 = sc_refresh[1];  sc_refresh = None
        mul_8 = float_7 * getitem_5;  float_7 = getitem_5 = None
        add_4 = float_6 + mul_8;  mul_8 = None
        float_8 = sc_dy_prev_1.float()
        getitem_7 = sc_coef2[1];  sc_coef2 = None
        mul_9 = float_8 * getitem_7;  float_8 = getitem_7 = None
        add_5 = add_4 + mul_9;  add_4 = mul_9 = None
        sub_2 = float_5 - add_5
        sub_3 = float_5 - float_6;  float_6 = None
        mul_10 = sub_3 * getitem_6;  sub_3 = getitem_6 = None
        abs_5 = sub_2.abs();  sub_2 = None
        sum_5 = abs_5.sum();  abs_5 = None
        abs_6 = add_5.abs();  add_5 = None
        sum_6 = abs_6.sum();  abs_6 = None
        abs_7 = mul_10.abs()
        sum_7 = abs_7.sum();  abs_7 = None
        abs_8 = float_5.abs();  float_5 = None
        sum_8 = abs_8.sum();  abs_8 = None
        stack_1 = torch.stack([sum_5, sum_6, sum_7, sum_8]);  sum_5 = sum_6 = sum_7 = sum_8 = None
        select_int_1 = torch.ops.aten.select.int(sc_stats, 0, 1);  sc_stats = None
        copy__default_4 = torch.ops.aten.copy_.default(select_int_1, stack_1);  select_int_1 = stack_1 = copy__default_4 = None
        neg_2 = -sc_dy_1
        neg_3 = -neg_2;  neg_2 = None
        to_1 = mul_10.to(torch.float32);  mul_10 = None
        copy__default_5 = torch.ops.aten.copy_.default(sc_dy_prev_1, neg_3);  sc_dy_prev_1 = neg_3 = copy__default_5 = None
        copy__default_6 = torch.ops.aten.copy_.default(sc_dy_1, to_1);  sc_dy_1 = to_1 = copy__default_6 = None
        copy__default_7 = torch.ops.aten.copy_.default(sc_y_full_1, hidden_states_1);  sc_y_full_1 = copy__default_7 = None

        mul_4: "f32[1, 2, 4]" = hidden_states_1 * 2.0;  hidden_states_1 = None
        return (mul_4,)
""",
        )
        self.assertExpectedInline(
            explanation.cached_step_graph,
            """\
class GraphModule(torch.nn.Module):
    def forward(self, sc_y_full_1: "f32[1, 2, 4]", sc_dy_1: "f32[1, 2, 4]", sc_dy_prev_1: "f32[1, 2, 4]", sc_coef: "f32[2]", sc_coef2: "f32[2]"):
        getitem_4 = sc_coef[1];  sc_coef = None
        mul_2 = sc_dy_1 * getitem_4;  sc_dy_1 = getitem_4 = None
        add_2 = sc_y_full_1 + mul_2;  sc_y_full_1 = mul_2 = None
        getitem_5 = sc_coef2[1];  sc_coef2 = None
        mul_3 = sc_dy_prev_1 * getitem_5;  sc_dy_prev_1 = getitem_5 = None
        add_3 = add_2 + mul_3;  add_2 = mul_3 = None
        to_1 = add_3.to(torch.float32);  add_3 = None

        mul_4: "f32[1, 2, 4]" = to_1 * 2.0;  to_1 = None
        return (mul_4,)
""",
        )


def test_cached_step_reads_only_the_last_points_buffers():
    explanation = _explain(DummyDiT())
    cached = explanation.cached_step_graph
    assert "sc_y_full_2" in cached and "sc_dy_2" in cached
    for index in (0, 1):
        assert f"sc_y_full_{index}" not in cached and f"sc_dy_{index}" not in cached
    # No buffer writes and no block computation at a cached step.
    assert "copy_" not in cached
    assert "gain" not in cached
    assert [p.feeds_output for p in explanation.cache_points] == [False, False, True]
    # The full step writes every buffer: y_full, dy and the stats row of each point.
    assert explanation.full_step_graph.count("copy_.default(") == 3 * 3


def test_no_blocks_is_an_error_that_names_the_model():
    with pytest.raises(NoBlocksFoundError, match=r"NotADiT: found no transformer blocks.*'<name>\.<index>'"):
        sc_compile.explain(NotADiT(), torch.ones(1, 2, 8), torch.tensor([1.0]))


def test_backend_refuses_a_non_dit_module():
    compiled = torch.compile(NotADiT(), backend="scalingcache", options={"compiler": "eager"})
    with pytest.raises(Exception, match="NotADiT: found no transformer blocks"), torch.no_grad():
        compiled(torch.ones(1, 2, 8), torch.tensor([1.0]))


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("L['self'].__dict__['_modules']['transformer_blocks'].0.attn", "transformer_blocks.0.attn"),
        ("L['self'].blocks[3]", "blocks.3"),
        ("L['self']._modules['single_transformer_blocks']._modules['1']", "single_transformer_blocks.1"),
        (
            "L['self'].context_embedder.token_refiner.refiner_blocks.0",
            "context_embedder.token_refiner.refiner_blocks.0",
        ),
    ],
)
def test_normalize_module_path(raw, normalized):
    assert normalize_module_path(raw) == normalized


def test_nested_numbered_modules_are_not_blocks():
    class FakeNode:
        def __init__(self, paths):
            self.meta = {"nn_module_stack": {str(i): (p, object) for i, p in enumerate(paths)}}

    refiner = FakeNode(["L['self'].context_embedder", "L['self'].context_embedder.token_refiner.refiner_blocks.0"])
    block = FakeNode(["L['self'].transformer_blocks.2", "L['self'].transformer_blocks.2.attn"])
    assert top_level_block_of(refiner) is None  # type: ignore[arg-type]
    assert top_level_block_of(block) == "transformer_blocks.2"  # type: ignore[arg-type]
